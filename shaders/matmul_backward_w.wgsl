// Weight gradient of a dense linear layer (the LoRA A and B matrices):
//   dw[w_offset + n*K + k] (+)= alpha * sum_m dy[m, n] * x[m, k],   dy (M, N), x (M, K).
// The result lands in a flat gradient buffer at w_offset (y_stride = K, y_col_offset =
// w_offset). A workgroup computes TM rows (n) x NB columns (k); its threads stride over m.
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, N)
@group(0) @binding(2) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // flat dw

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k0 = wg.x * NB;
    let n0 = wg.y * TM;
    var acc: array<f32, 32>;
    for (var m = lid; m < p.m; m += WG) {
        var g: array<f32, 4>;
        for (var r = 0u; r < TM; r++) {
            if (n0 + r < p.n) { g[r] = dy[m * p.n + n0 + r]; }
        }
        for (var c = 0u; c < NB; c++) {
            if (k0 + c < p.k) {
                let xv = x[m * p.k + k0 + c];
                for (var r = 0u; r < TM; r++) { acc[c * TM + r] += g[r] * xv; }
            }
        }
    }
    reduce_and_store(acc, lid, n0, k0, p.n, p.k);
}
