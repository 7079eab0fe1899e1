// The matrix operations of common/coop_mma.wgsl written out in plain WGSL, for adapters
// without cooperative matrices (lavapipe): the same f16 operands from the same staged tiles,
// products exact in f32 and summed in f32, so the coop16 kernels' staging, row scaling, split
// reductions and epilogue run, and are tested, where no matrix unit is. Lane l of a 32-thread
// group (its "subgroup") holds row l / 2, columns 8 (l % 2) .. + 8 of each accumulator; a
// loaded fragment is just where it lies in the staged tile, read when it is multiplied (the
// core multiplies between the same barriers as it loads).
enable f16;

struct AccFrag {
    v: array<f32, 8>,
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
    var out = c;
    let r = a + emu_lane / 2u;
    let c0 = b + (emu_lane % 2u) * 8u;
    for (var j = 0u; j < 16u; j++) {
        let x = f32(a_half[j * HS + r]);
        for (var e = 0u; e < 8u; e++) {
            out.v[e] += x * f32(b_half[j * HS + c0 + e]);
        }
    }
    return out;
}

fn store_frag(f: AccFrag, at: u32) {
    let i = at + (emu_lane / 2u) * 16u + (emu_lane % 2u) * 8u;
    for (var e = 0u; e < 8u; e++) {
        frag_out[i + e] = f.v[e];
    }
}
