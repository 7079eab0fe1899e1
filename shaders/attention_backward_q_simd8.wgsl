// Attention backward, first pass, for CPU rasterizers: the contract of attention_backward_q.wgsl
// (query gradient, and delta stored next to the log-sum-exp), organised like
// attention_simd8.wgsl: one subgroup of 8 lanes per 8 consecutive queries of a head, a query
// per lane, key and value rows loaded once, spread over the lanes and broadcast.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;      // (T, H * hd)
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;      // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;      // (T, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read> out: array<vec4<f32>>;    // (T, H * hd)
@group(0) @binding(6) var<storage, read> dout: array<vec4<f32>>;   // (T, H * hd)
@group(0) @binding(7) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>; // (T, H * hd)

#include "common/attention_simd8.wgsl"

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let l = query_lane(wg, lane);
    var delta = 0.0;
#for i in 0..64
    var q{i} = vec4<f32>();
    var g{i} = vec4<f32>();
    var dq{i} = vec4<f32>();
    if ({i}u < HD4 && {i}u < l.hd4) {
        q{i} = q[l.base + {i}u] * p.scale;
        g{i} = dout[l.base + {i}u];
        delta += dot(g{i}, out[l.base + {i}u]);
    }
#end
    let lse = stats[l.tq * p.n_heads + l.h].x;
    let first_key = key_start[l.tq];
    let j_lo = subgroupMin(select(0xffffffffu, first_key, l.valid));
    let j_hi = subgroupMax(select(0u, l.tq + 1u, l.valid));
    for (var j = j_lo; j < j_hi; j++) {
        let row = j * l.kv_row + l.kv_head;
#for c in 0..8
        var kl{c} = vec4<f32>();
        var vl{c} = vec4<f32>();
        if ({c * 8}u < HD4 && {c * 8}u + lane < l.hd4) {
            kl{c} = k[row + {c * 8}u + lane];
            vl{c} = v[row + {c * 8}u + lane];
        }
#end
        var s = 0.0;
        var dp = 0.0;
#for i in 0..64
        var k{i} = vec4<f32>();
        if ({i}u < HD4 && {i}u < l.hd4) {
            k{i} = subgroupBroadcast(kl{i / 8}, {i % 8}u);
            s += dot(q{i}, k{i});
            dp += dot(g{i}, subgroupBroadcast(vl{i / 8}, {i % 8}u));
        }
#end
        let seen = l.valid && j >= first_key && j <= l.tq;
        let ds = select(0.0, exp(softcap(s) - lse) * (dp - delta) * softcap_grad(s), seen);
#for i in 0..64
        if ({i}u < HD4 && {i}u < l.hd4) { dq{i} += ds * k{i}; }
#end
    }
    if (l.valid) {
#for i in 0..64
        if ({i}u < HD4 && {i}u < l.hd4) { dq[l.base + {i}u] = dq{i} * p.scale; }
#end
        stats[l.t * p.n_heads + l.h] = vec2<f32>(lse, delta);
    }
}
