// Linear layer over an f16 weight for one row of x (decoding). The weight is stored as packed
// pairs (two halves per u32, the lower half first), widened to f32 in the kernel; no shader-f16 support is needed. Used for lm_head and
// other large tables. y[m, y_col_offset + n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
// Requires K even, so a pair never straddles a row. See common/matvec.wgsl for the work split.
#include "common/params.wgsl"
#include "common/matvec.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 2) packed f16 pairs
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)
@group(0) @binding(5) var<storage, read> aux: array<f32>;          // (K) see x_in, or a dummy
@group(0) @binding(6) var<storage, read> lora_h: array<f32>;       // (r) x A^T, or a dummy
@group(0) @binding(7) var<storage, read> lora_b: array<f32>;       // the adapter's B at lora_b, or a dummy

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wg.x * NB;
    let m0 = wg.y * TM;
    let pairs_per_row = p.k / 2u;
    var acc: array<f32, 32>;                                   // (NB, TM) partial sums
    for (var j = lid; j < pairs_per_row; j += WG) {
        let k = j * 2u;
        var xv: array<vec2<f32>, 4>;
        for (var r = 0u; r < TM; r++) {
            if (m0 + r < p.m) { xv[r] = vec2<f32>(x_in(m0 + r, k), x_in(m0 + r, k + 1u)); }
        }
        for (var c = 0u; c < NB; c++) {
            if (n0 + c < p.n) {
                let wv = unpack2x16float(w[((n0 + c) * p.k + k) / 2u]);
                for (var r = 0u; r < TM; r++) { acc[c * TM + r] += dot(xv[r], wv); }
            }
        }
    }
    reduce_and_store(acc, lid, m0, n0, p.m, p.n);
}
