// The tiled matrix product shared by every many-row matmul kernel (forward, dX and dW):
//   out[r, c] = sum_j load_a(r, j) * load_b(c, j)   for r < n_rows, c < n_cols, j < n_red,
// then the epilogue (common/matmul_store.wgsl). The including shader declares `p` (MatmulParams), `bias`, `y` and the
// two element loaders `load_a(row, j)` and `load_b(col, j)`, which return 0 outside the matrix;
// that is all that differs between a forward pass, an input gradient and a weight gradient, or
// between dense, f16 and NF4 weights.
//
// Work split: a workgroup of 64 threads computes a BR x BC = 64 x 64 output block. The
// reduction runs in steps of BK = 16: the threads stage a (BK, BR) slice of A and a (BK, BC)
// slice of B in workgroup memory (each element is loaded, and an NF4 weight dequantized, once
// per workgroup), then each thread accumulates its own 8 x 8 sub-block from there. Two barriers
// per step and no reduction tree. CPU rasterizers get register-tiled kernels instead (see
// common/simd8.wgsl).

const BR: u32 = 64u;
const BC: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> a_tile: array<f32, 1024>;                           // (BK, BR)
var<workgroup> b_tile: array<f32, 1024>;                           // (BK, BC)

#include "common/matmul_store.wgsl"

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tr = (lid / 8u) * 8u;
    let tc = (lid % 8u) * 8u;
    var acc: array<vec4<f32>, 16>;                                 // rows tr..tr+8, cols tc..tc+8
    for (var j0 = 0u; j0 < n_red; j0 += BK) {
        for (var i = lid; i < BR * BK; i += 64u) {
            let r = i / BK;
            let j = i % BK;
            a_tile[j * BR + r] = load_a(r0 + r, j0 + j);
        }
        for (var i = lid; i < BC * BK; i += 64u) {
            let c = i / BK;
            let j = i % BK;
            b_tile[j * BC + c] = load_b(c0 + c, j0 + j);
        }
        workgroupBarrier();
        for (var j = 0u; j < BK; j++) {
            let bb = j * BC + tc;
            let b0 = vec4<f32>(b_tile[bb], b_tile[bb + 1u], b_tile[bb + 2u], b_tile[bb + 3u]);
            let b1 = vec4<f32>(b_tile[bb + 4u], b_tile[bb + 5u], b_tile[bb + 6u], b_tile[bb + 7u]);
            for (var r = 0u; r < 8u; r++) {
                let a = a_tile[j * BR + tr + r];
                acc[2u * r] += a * b0;
                acc[2u * r + 1u] += a * b1;
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 8u; r++) {
        store4(r0 + tr + r, c0 + tc, acc[2u * r], n_rows, n_cols);
        store4(r0 + tr + r, c0 + tc + 4u, acc[2u * r + 1u], n_rows, n_cols);
    }
}
