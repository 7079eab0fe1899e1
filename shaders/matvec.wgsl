// Dense linear layer for one row of x (decoding): y[0, y_col_offset + n] = alpha * sum_k x[k] *
// w[w_row(n) + k] (+ bias[n]): w is (N, K) row-major as PyTorch stores nn.Linear weights, from
// element w_offset or gathered from blocks of rows (common/dense_rows.wgsl). See
// common/matvec.wgsl for the work split.
#include "common/params.wgsl"
#include "common/matvec.wgsl"
#include "common/dense_rows.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (w_offset + N * K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy when has_bias = 0
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)
@group(0) @binding(5) var<storage, read> aux: array<f32>;          // (K) see x_in, or a dummy
@group(0) @binding(6) var<storage, read> lora_h: array<f32>;       // (r) x A^T, or a dummy
@group(0) @binding(7) var<storage, read> lora_b: array<f32>;       // the adapter's B at lora_b, or a dummy

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wg.x * NB;
    let m0 = wg.y * TM;
    var acc: array<f32, 32>;                                   // (NB, TM) partial sums
    for (var k = lid; k < p.k; k += WG) {
        var xv: array<f32, 4>;
        for (var r = 0u; r < TM; r++) {
            if (m0 + r < p.m) { xv[r] = x_in(m0 + r, k); }
        }
        for (var c = 0u; c < NB; c++) {
            if (n0 + c < p.n) {
                let wv = w[w_row(n0 + c) + k];
                for (var r = 0u; r < TM; r++) { acc[c * TM + r] += xv[r] * wv; }
            }
        }
    }
    reduce_and_store(acc, lid, m0, n0, p.m, p.n);
}
