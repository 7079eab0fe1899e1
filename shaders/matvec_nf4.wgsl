// Linear layer over an NF4 weight for one row of x (decoding), dequantized on the fly:
// y[m, n] = sum_k x[m, k] * NF4_CODE[q(n, k)] * absmax[(n*K + k) / block_size] (+ bias[n]).
// The weight never leaves 4 bits in GPU memory. Each thread takes one packed word (8 values) of
// a row at a time. Requires K % 8 == 0 and block_size % 8 == 0, so a word never straddles a row
// or a block. See common/matvec.wgsl for the work split.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/matvec.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // (M, y_stride)
@group(0) @binding(6) var<storage, read> aux: array<f32>;          // (K) see x_in, or a dummy
@group(0) @binding(7) var<storage, read> lora_h: array<f32>;       // (r) x A^T, or a dummy
@group(0) @binding(8) var<storage, read> lora_b: array<f32>;       // the adapter's B at lora_b, or a dummy

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wg.x * NB;
    let m0 = wg.y * TM;
    let words_per_row = p.k / 8u;
    var acc: array<f32, 32>;                                   // (NB, TM) partial sums
    for (var j = lid; j < words_per_row; j += WG) {
        let k = j * 8u;
        var xv: array<f32, 32>;                                    // (TM, 8)
        for (var r = 0u; r < TM; r++) {
            if (m0 + r < p.m) {
                for (var e = 0u; e < 8u; e++) { xv[r * 8u + e] = x_in(m0 + r, k + e); }
            }
        }
        for (var c = 0u; c < NB; c++) {
            let n = n0 + c;
            if (n < p.n) {
                let flat = n * p.k + k;
                let word = w[flat / 8u];
                let bc = block_coeffs(flat / BLOCK_SIZE);
                for (var e = 0u; e < 8u; e++) {
                    let wv = nf4_value(word, e) * bc.x + bc.y;
                    for (var r = 0u; r < TM; r++) { acc[c * TM + r] += xv[r * 8u + e] * wv; }
                }
            }
        }
    }
    reduce_and_store(acc, lid, m0, n0, p.m, p.n);
}
