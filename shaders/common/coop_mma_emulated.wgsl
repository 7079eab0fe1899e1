// The matrix operations of common/coop_mma.wgsl written out in plain WGSL, for adapters
// without cooperative matrices (lavapipe): the same f16 operands from the same staged tiles,
// products exact in f32 and summed in f32, so the coop16 kernels' staging, row scaling, split
// reductions and epilogue run, and are tested, where no matrix unit is. Lane l of a 32-thread
// group (its "subgroup") holds rows 2 (l / 4) .. + 2, columns 4 (l % 4) .. + 4 of each
// accumulator. A loaded fragment is the lane's share of the staged tile in registers (the rows
// or columns its outputs need, widened to f32), read once however many products use it: the
// core loads 2 of A and 4 of B a step and multiplies each pair, so a lane reads 320 staged
// halves a step for 1,024 multiply-adds (reading them at each product took 1,152).
enable f16;

struct AccFrag {
    lo: vec4<f32>,                                                 // row 2 (l / 4)
    hi: vec4<f32>,                                                 // the row after it
}

struct AFrag {
    v: array<vec2<f32>, 16>,                                       // A(r, j), A(r + 1, j) at v[j]
}

struct BFrag {
    v: array<vec4<f32>, 16>,                                       // B(j, c .. c + 4) at v[j]
}

var<private> emu_lane: u32;

fn mma_lane(lane: u32) {
    emu_lane = lane;
}

fn load_a_frag(at: u32) -> AFrag {
    var f: AFrag;
    let r = at + (emu_lane / 4u) * 2u;
    for (var j = 0u; j < 16u; j++) {
        f.v[j] = vec2<f32>(f32(a_half[j * HS + r]), f32(a_half[j * HS + r + 1u]));
    }
    return f;
}

fn load_b_frag(at: u32) -> BFrag {
    var f: BFrag;
    let c = at + (emu_lane % 4u) * 4u;
    for (var j = 0u; j < 16u; j++) {
        let i = j * HS + c;
        f.v[j] = vec4<f32>(f32(b_half[i]), f32(b_half[i + 1u]), f32(b_half[i + 2u]), f32(b_half[i + 3u]));
    }
    return f;
}

fn mma(a: AFrag, b: BFrag, c: AccFrag) -> AccFrag {
    // Indexed through copies in variables: a value array indexed by a loop counter is stored
    // whole to a temporary at each access (in naga's SPIR-V): slower than no registers at all.
    var out = c;
    var av = a.v;
    var bv = b.v;
    for (var j = 0u; j < 16u; j++) {
        out.lo += av[j].x * bv[j];
        out.hi += av[j].y * bv[j];
    }
    return out;
}

fn store_frag(f: AccFrag, at: u32) {
    let i = at + (emu_lane / 4u) * 32u + (emu_lane % 4u) * 4u;
    for (var e = 0u; e < 4u; e++) {
        frag_out[i + e] = f.lo[e];
        frag_out[i + 16u + e] = f.hi[e];
    }
}
