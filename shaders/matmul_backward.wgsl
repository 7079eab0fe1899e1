// Backward of a dense linear layer with respect to its input (the weight gets its own
// gradient from matmul_backward_w.wgsl when it is trainable):
//   dx[m, y_col_offset + k] (+)= alpha * sum_n dy[m, dy_col_offset + n] * w[w_offset + n*K + k].
// A workgroup computes TM rows x NB consecutive columns of dx; its threads stride over n. See
// common/matmul.wgsl for the reduction.
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (w_offset + N * K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k0 = wg.x * NB;
    let m0 = wg.y * TM;
    var acc: array<f32, 32>;
    for (var n = lid; n < p.n; n += WG) {
        var g: array<f32, 4>;
        for (var r = 0u; r < TM; r++) {
            if (m0 + r < p.m) { g[r] = dy[(m0 + r) * p.dy_stride + p.dy_col_offset + n]; }
        }
        for (var c = 0u; c < NB; c++) {
            if (k0 + c < p.k) {
                let wv = w[p.w_offset + n * p.k + k0 + c];
                for (var r = 0u; r < TM; r++) { acc[c * TM + r] += g[r] * wv; }
            }
        }
    }
    reduce_and_store(acc, lid, m0, k0, p.m, p.k);
}
