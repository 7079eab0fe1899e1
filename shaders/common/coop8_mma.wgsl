// The matrix operations of common/coop8.wgsl on the GPU's matrix units, through wgpu's
// cooperative matrices (EXPERIMENTAL_COOPERATIVE_MATRIX): 8 x 8 x 8 fragments with f32
// operands and f32 accumulators, each held by one subgroup of 32 lanes (Metal's
// simdgroup_float8x8). Fragments are loaded from the core's staged tiles: A(r, j) at
// stage[at + j * FS + r], B(j, c) at stage[at + j * FS + c]; an accumulator is stored as C(r, c)
// at stage[at + r * stride + c]. common/coop8_mma_emulated.wgsl writes the same operations out in
// plain WGSL.
enable wgpu_cooperative_matrix;

alias AccFrag = coop_mat8x8<f32, C>;

fn mma_lane(lane: u32) {}

fn load_a_frag(at: u32) -> coop_mat8x8<f32, A> {
    return coopLoad<coop_mat8x8<f32, A>>(&stage[at], FS);
}

fn load_b_frag(at: u32) -> coop_mat8x8<f32, B> {
    return coopLoadT<coop_mat8x8<f32, B>>(&stage[at], FS);
}

fn mma(a: coop_mat8x8<f32, A>, b: coop_mat8x8<f32, B>, c: AccFrag) -> AccFrag {
    return coopMultiplyAdd(a, b, c);
}

fn store_frag(f: AccFrag, at: u32, stride: u32) {
    coopStoreT(f, &stage[at], stride);
}
