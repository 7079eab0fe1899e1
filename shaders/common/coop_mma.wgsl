// The matrix operations of common/coop16.wgsl on the GPU's matrix units, through wgpu's
// cooperative matrices (EXPERIMENTAL_COOPERATIVE_MATRIX): 16 x 16 x 16 fragments with f16
// operands and f32 accumulators, each held by one subgroup of 32 lanes. Fragments are loaded
// from the core's staged tiles: A(r, j) at a_half[j * HS + at + r], B(j, c) at
// b_half[j * HS + at + c]; an accumulator is stored as C(r, c) at frag_out[at + 16 r + c].
// common/coop_mma_emulated.wgsl writes the same operations out in plain WGSL.
enable f16;
enable wgpu_cooperative_matrix;

alias AccFrag = coop_mat16x16<f32, C>;

fn mma_lane(lane: u32) {}

fn load_a_frag(at: u32) -> coop_mat16x16<f16, A> {
    return coopLoad<coop_mat16x16<f16, A>>(&a_half[at], HS);
}

fn load_b_frag(at: u32) -> coop_mat16x16<f16, B> {
    return coopLoadT<coop_mat16x16<f16, B>>(&b_half[at], HS);
}

fn mma(a: coop_mat16x16<f16, A>, b: coop_mat16x16<f16, B>, c: AccFrag) -> AccFrag {
    return coopMultiplyAdd(a, b, c);
}

fn store_frag(f: AccFrag, at: u32) {
    coopStoreT(f, &frag_out[at], 16u);
}
