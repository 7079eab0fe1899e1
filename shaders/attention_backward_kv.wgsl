// Attention backward, second pass: key and value gradients, one workgroup per (key j, kv
// head). Every query head of the group contributes; with P and dS as in
// attention_backward_q.wgsl (which stored delta):
//   dv[j] = sum_{t, h} P[t, j] * dout[t, h]
//   dk[j] = scale * sum_{t, h} dS[t, j] * q[t, h]
// The queries that see key j are t >= j with key_start[t] <= j; key_start never decreases
// along a packed batch, so the scan stops at the first tile that starts past j's sample.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read> dout: array<f32>;         // (T, H * hd)
@group(0) @binding(6) var<storage, read> stats: array<vec2<f32>>;  // (T * H): (lse, delta)
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;     // (T, Hkv * hd)
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;     // (T, Hkv * hd)

var<workgroup> ks: array<f32, 256>;
var<workgroup> vs: array<f32, 256>;
var<workgroup> pw: array<f32, 64>;
var<workgroup> ds: array<f32, 64>;
var<workgroup> tile_start: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wg.x;
    let kvh = wg.y;
    if (j >= p.n_tokens || kvh >= p.n_kv_heads) { return; }
    let hd = p.head_dim;
    let rep = p.n_heads / p.n_kv_heads;
    let kb = j * p.kv_stride + kvh * hd;
    for (var d = lid; d < hd; d += 64u) {
        ks[d] = k[kb + d];
        vs[d] = v[kb + d];
    }
    workgroupBarrier();
    var acc_k = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var acc_v = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var t0 = j; t0 < p.n_tokens; t0 += 64u) {
        if (lid == 0u) { tile_start = key_start[t0]; }
        if (workgroupUniformLoad(&tile_start) > j) { break; }
        let cnt = min(64u, p.n_tokens - t0);
        for (var hr = 0u; hr < rep; hr++) {
            let h = kvh * rep + hr;
            let t = t0 + lid;
            var pv = 0.0;
            var g = 0.0;
            if (lid < cnt && key_start[t] <= j) {
                let qb = (t * p.n_heads + h) * hd;
                var s = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < hd; d++) {
                    s += q[qb + d] * ks[d];
                    dp += dout[qb + d] * vs[d];
                }
                let st = stats[t * p.n_heads + h];
                pv = exp(softcap(s * p.scale) - st.x);
                g = pv * (dp - st.y) * softcap_grad(s * p.scale);
            }
            pw[lid] = pv;
            ds[lid] = g;
            workgroupBarrier();
            for (var i = 0u; i < cnt; i++) {
                let qb = ((t0 + i) * p.n_heads + h) * hd;
                for (var r = 0u; r < 4u; r++) {
                    let d = lid + 64u * r;
                    if (d < hd) {
                        acc_v[r] += pw[i] * dout[qb + d];
                        acc_k[r] += ds[i] * q[qb + d];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + 64u * r;
        if (d < hd) {
            dk[kb + d] = acc_k[r] * p.scale;
            dv[kb + d] = acc_v[r];
        }
    }
}
