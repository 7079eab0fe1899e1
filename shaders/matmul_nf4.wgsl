// Linear layer over an NF4 weight, dequantized on the fly:
// y[m, n] = sum_k x[m, k] * NF4_CODE[q(n, k)] * absmax[(n*K + k) / block_size] (+ bias[n]).
// The weight never leaves 4 bits in GPU memory. Requires K % 64 == 0 and block_size % 8 == 0,
// so a 64-wide k tile covers whole packed words and never straddles a row.
#include "common/nf4.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // (M, y_stride)

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wg.x * 64u + lid;
    let m0 = wg.y * TM;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var k0 = 0u; k0 < p.k; k0 += 64u) {
        load_x_tile(m0, k0, lid);
        workgroupBarrier();
        if (n < p.n) {
            let flat = n * p.k + k0;
            for (var kk = 0u; kk < 64u; kk += 8u) {
                let word = w[(flat + kk) / 8u];
                let scale = absmax[(flat + kk) / p.block_size];
                for (var e = 0u; e < 8u; e++) {
                    let wv = nf4_value(word, e) * scale;
                    for (var r = 0u; r < TM; r++) { acc[r] += xs[r * 64u + kk + e] * wv; }
                }
            }
        }
        workgroupBarrier();
    }
    store_rows(n, m0, acc);
}
