// The matrix operations of common/coop8_mma.wgsl written out in plain WGSL, for adapters
// without cooperative matrices (lavapipe): the same f32 operands from the same staged tiles,
// multiplied and summed in f32, so the coop8 kernels' staging, fragment layout, split
// reductions and epilogue run, and are tested, where no matrix unit is. Lane l of a 32-thread
// group (its "subgroup") holds row l / 4, columns 2 (l % 4) .. + 2 of each accumulator; a loaded
// fragment is just where it lies in the staged tile, read when it is multiplied (the core
// multiplies between the same barriers as it loads).

struct AccFrag {
    v: vec2<f32>,
}

var<private> emu_lane: u32;

fn mma_lane(lane: u32) {
    emu_lane = lane;
}

fn load_a_frag(at: u32) -> u32 {
    return at;
}

fn load_b_frag(at: u32) -> u32 {
    return at;
}

fn mma(a: u32, b: u32, c: AccFrag) -> AccFrag {
    var out = c.v;
    let r = a + emu_lane / 4u;
    let c0 = b + (emu_lane % 4u) * 2u;
    for (var j = 0u; j < 8u; j++) {
        out += stage[j * FS + r] * vec2<f32>(stage[j * FS + c0], stage[j * FS + c0 + 1u]);
    }
    return AccFrag(out);
}

fn store_frag(f: AccFrag, at: u32, stride: u32) {
    let i = at + (emu_lane / 4u) * stride + (emu_lane % 4u) * 2u;
    stage[i] = f.v.x;
    stage[i + 1u] = f.v.y;
}
