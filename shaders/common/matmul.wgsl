// The tiled matrix product shared by every many-row matmul kernel (forward, dX and dW):
//   out[r, c] = sum_j load_a(r, j) * load_b(c, j)   for r < n_rows, c < n_cols, j < n_red,
// then the epilogue (common/matmul_store.wgsl). The including shader declares `p` (MatmulParams), `bias`, `y` and the
// two element loaders `load_a(row, j)` and `load_b(col, j)`, which return 0 outside the matrix;
// that is all that differs between a forward pass, an input gradient and a weight gradient, or
// between dense, f16 and NF4 weights.
//
// Work split: a workgroup of 256 threads computes a BR x BC = 64 x 64 output block, each
// thread a 4 x 4 sub-block. The reduction runs in steps of BK = 16: the threads stage a (BK, BR)
// slice of A and a (BK, BC) slice of B in workgroup memory (each element is loaded, and an NF4
// weight dequantized, once per workgroup), then accumulate from there. Two barriers per step
// and no reduction tree.
//
// Split reduction: when the launcher sets p.split_k (a multiple of BK), workgroup z reduces
// j in [z * split_k, (z + 1) * split_k) only and writes its raw sums to slice z of a scratch
// output (the launcher binds it as `y`, with stride n_cols, alpha 1 and no bias or
// accumulation); matmul_split_reduce.wgsl then adds the slices and applies the epilogue. Small
// output grids with long reductions (a LoRA A product, the LM head's input gradient) get enough
// workgroups to fill a large GPU this way. CPU rasterizers get register-tiled kernels instead
// (see common/simd8.wgsl).

const BR: u32 = 64u;
const BC: u32 = 64u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;
var<workgroup> a_tile: array<f32, 1024>;                           // (BK, BR)
var<workgroup> b_tile: array<f32, 1024>;                           // (BK, BC)

#include "common/matmul_store.wgsl"

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tr = (lid / 16u) * 4u;
    let tc = (lid % 16u) * 4u;
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    var acc: array<vec4<f32>, 4>;                                  // rows tr..tr+4, cols tc..tc+4
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        for (var i = lid; i < BR * BK; i += TILE_THREADS) {
            let r = i / BK;
            let j = i % BK;
            a_tile[j * BR + r] = load_a(r0 + r, j0 + j);
        }
        for (var i = lid; i < BC * BK; i += TILE_THREADS) {
            let c = i / BK;
            let j = i % BK;
            b_tile[j * BC + c] = load_b(c0 + c, j0 + j);
        }
        workgroupBarrier();
        for (var j = 0u; j < BK; j++) {
            let bb = j * BC + tc;
            let b = vec4<f32>(b_tile[bb], b_tile[bb + 1u], b_tile[bb + 2u], b_tile[bb + 3u]);
            let ab = j * BR + tr;
            acc[0] += a_tile[ab] * b;
            acc[1] += a_tile[ab + 1u] * b;
            acc[2] += a_tile[ab + 2u] * b;
            acc[3] += a_tile[ab + 3u] * b;
        }
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output.
    let zr = wg.z * n_rows;
    for (var r = 0u; r < 4u; r++) {
        store4(zr + r0 + tr + r, c0 + tc, acc[r], zr + n_rows, n_cols);
    }
}
