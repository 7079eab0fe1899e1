// The second pass of split-key decoding: adds the partial softmaxes that attention.wgsl wrote
// for each slice of the keys (weighted value sums, the slice's max m_s and sum of exponentials
// l_s) into the attention output, as one softmax over all the keys would give it:
// M = max m_s, L = sum l_s exp(m_s - M), out = sum acc_s exp(m_s - M) / L, and the
// log-sum-exp M + log L into `stats`. One workgroup per (query, head); a slice with no visible
// key (m_s = -3.4e38, l_s = 0) weighs nothing. With p.key_ends, a query with no keys (first =
// end in key_start) is left alone, as attention.wgsl leaves it.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
@group(0) @binding(1) var<storage, read> parts: array<f32>;            // (T * H * n_splits, hd + 2)
@group(0) @binding(2) var<storage, read> key_start: array<u32>;        // (T, 2) with key_ends
@group(0) @binding(3) var<storage, read_write> out: array<f32>;        // (T, H * hd)
@group(0) @binding(4) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, 0)

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wg.x;
    let h = wg.y;
    if (t >= p.n_tokens || h >= p.n_heads) { return; }
    if (p.key_ends != 0u && key_start[2u * t] >= key_start[2u * t + 1u]) { return; }
    let hd = p.head_dim;
    let row = hd + 2u;
    let first = (t * p.n_heads + h) * p.n_splits * row;
    var m = -3.402823e38;
    for (var s = 0u; s < p.n_splits; s++) { m = max(m, parts[first + s * row + hd]); }
    var l = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        l += parts[first + s * row + hd + 1u] * exp(parts[first + s * row + hd] - m);
    }
    let o_base = (t * p.n_heads + h) * hd;
    for (var d = lid; d < hd; d += 64u) {
        var o = 0.0;
        for (var s = 0u; s < p.n_splits; s++) {
            o += parts[first + s * row + d] * exp(parts[first + s * row + hd] - m);
        }
        out[o_base + d] = o / l;
    }
    if (lid == 0u) { stats[t * p.n_heads + h] = vec2<f32>(m + log(l), 0.0); }
}
