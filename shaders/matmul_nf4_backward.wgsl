// Backward of an NF4 linear layer with respect to its input. The 4-bit base weight is frozen,
// so this is the only gradient it produces:
//   dx[m, y_col_offset + k] (+)= alpha * sum_n dy[m, dy_col_offset + n] * dequant(w)[n, k].
// A workgroup computes TM rows x 8 columns of dx, which is exactly one packed word of each
// weight row (and, as block_size % 8 == 0, one absmax); its threads stride over n.
#include "common/nf4.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

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
        let flat = n * p.k + k0;
        let word = w[flat / 8u];
        let scale = absmax[flat / p.block_size];
        for (var c = 0u; c < NB; c++) {
            let wv = nf4_value(word, c) * scale;
            for (var r = 0u; r < TM; r++) { acc[c * TM + r] += g[r] * wv; }
        }
    }
    reduce_and_store(acc, lid, m0, k0, p.m, p.k);
}
