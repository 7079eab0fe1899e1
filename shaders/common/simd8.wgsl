// Register-tiled matmuls for CPU rasterizers such as Mesa's lavapipe, whose subgroups are the
// CPU's 8 SIMD lanes. There every load from a storage buffer or from workgroup memory is
// gathered lane by lane and costs many times an FMA, so the tiled kernels (common/matmul.wgsl),
// which stage both operands through workgroup memory, spend most of their time loading. These
// kernels load each operand element once per workgroup straight from its storage buffer (the
// CPU's caches do the staging) and reuse it from registers:
//   - a workgroup is one subgroup of 8 lanes and computes a 32 x 32 output block;
//   - lane l owns output columns 4l..4l+3 of the block and loads their B values as vec4s;
//   - the A values of the block's 32 rows are loaded one row per lane (rows l, 8+l, 16+l,
//     24+l) and handed to the other lanes with subgroupBroadcast, a register shuffle;
//   - each lane keeps 32 vec4 accumulators, acc0..acc31. A broadcast's lane index must be a
//     constant, so these loops are unrolled with `#for` (see `unroll` in shaders/src/lib.rs).
// Rows and columns past the matrix are clamped on load and skipped on store. The launchers pick
// these kernels when the adapter is a CPU with subgroups of exactly 8 lanes, and fall back to the
// tiled kernels for shapes they do not take (a reduction or stride that is not a multiple of 4).
#include "common/matmul_store.wgsl"

// Four dot products of `a` with b0..b3.
fn dot4(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

// Eight consecutive elements of a weight row (what a forward kernel's `load_w8` returns).
struct Eight {
    lo: vec4<f32>,
    hi: vec4<f32>,
}
