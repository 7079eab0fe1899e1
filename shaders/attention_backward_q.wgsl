// Attention backward, first pass: the query gradient, one workgroup per (query t, head h).
// With P the softmax of the forward pass (recomputed from the stored log-sum-exp):
//   delta[t, h] = sum_d dout[t, h, d] * out[t, h, d]
//   dS[t, j]    = P[t, j] * (dout[t, h] . v[j] - delta[t, h])
//   dq[t, h]    = scale * sum_j dS[t, j] * k[j]
// delta is stored next to the log-sum-exp for the second pass (attention_backward_kv.wgsl).
// Keys, positions and the key_start rule are those of attention.wgsl, with pos_offset 0.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read> out: array<f32>;          // (T, H * hd)
@group(0) @binding(6) var<storage, read> dout: array<f32>;         // (T, H * hd)
@group(0) @binding(7) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;     // (T, H * hd)

var<workgroup> qs: array<f32, 256>;
var<workgroup> gs: array<f32, 256>;
var<workgroup> ds: array<f32, 64>;
var<workgroup> part: array<f32, 64>;
var<workgroup> first_key: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wg.x;
    let h = wg.y;
    if (t >= p.n_tokens || h >= p.n_heads) { return; }
    let hd = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let base = (t * p.n_heads + h) * hd;
    var dsum = 0.0;
    for (var d = lid; d < hd; d += 64u) {
        qs[d] = q[base + d];
        gs[d] = dout[base + d];
        dsum += gs[d] * out[base + d];
    }
    part[lid] = dsum;
    if (lid == 0u) { first_key = key_start[t]; }
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { part[lid] += part[lid + s]; }
        workgroupBarrier();
    }
    let delta = part[0];
    let lse = stats[t * p.n_heads + h].x;
    let j_start = workgroupUniformLoad(&first_key);
    let n_keys = t + 1u;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var j0 = j_start; j0 < n_keys; j0 += 64u) {
        let j = j0 + lid;
        var g = 0.0;
        if (j < n_keys) {
            let kb = j * p.kv_stride + kvh * hd;
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < hd; d++) {
                s += qs[d] * k[kb + d];
                dp += gs[d] * v[kb + d];
            }
            let sc = s * p.scale;
            g = exp(softcap(sc) - lse) * (dp - delta) * softcap_grad(sc);
        }
        ds[lid] = g;
        workgroupBarrier();
        let cnt = min(64u, n_keys - j0);
        for (var i = 0u; i < cnt; i++) {
            let kb = (j0 + i) * p.kv_stride + kvh * hd;
            for (var r = 0u; r < 4u; r++) {
                let d = lid + 64u * r;
                if (d < hd) { acc[r] += ds[i] * k[kb + d]; }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + 64u * r;
        if (d < hd) { dq[base + d] = acc[r] * p.scale; }
    }
    if (lid == 0u) { stats[t * p.n_heads + h] = vec2<f32>(lse, delta); }
}
