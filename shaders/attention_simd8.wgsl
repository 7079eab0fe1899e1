// Causal GQA attention for CPU rasterizers (see common/simd8.wgsl for why): the same contract
// as attention.wgsl (key_ends included; no split keys), but a workgroup is one subgroup of 8 lanes that handles 8 consecutive
// queries of one head, a query per lane. The 8 queries share every key and value row: each
// row is loaded once, spread over the lanes (lane l holds vec4s l, l+8, l+16, ... of it),
// and handed round with subgroupBroadcast; each lane keeps its query and its output in
// registers and runs its own online softmax. head_dim is a multiple of 4 and at most 4 * HD4 (the
// loops are written for 64 vec4s, a head of 256; the HD4 of a variant leaves the rest out).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;      // (T, H * hd)
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>; // (positions, Hkv * hd)
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<f32>>; // (positions, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>; // (T, H * hd)
@group(0) @binding(6) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)

#include "common/attention_simd8.wgsl"

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let l = query_lane(wg, lane);
    // This lane's query, pre-scaled, and its visible keys first_key ..= last_key.
#for i in 0..64
    var q{i} = vec4<f32>();
    var o{i} = vec4<f32>();
    if ({i}u < HD4 && {i}u < l.hd4) { q{i} = q[l.base + {i}u] * p.scale; }
#end
    var first_key = key_start[l.tq];
    var last_key = p.pos_offset + l.tq;
    var valid = l.valid;
    if (p.key_ends != 0u) {
        // Rows of their own sequences (attention.wgsl's key_ends): a row of no keys is left alone.
        let end = key_start[2u * l.tq + 1u];
        first_key = key_start[2u * l.tq];
        last_key = end - 1u;
        valid = valid && first_key < end;
    }
    // The keys any lane sees; lanes past the last query see none.
    let j_lo = subgroupMin(select(0xffffffffu, first_key, valid));
    let j_hi = subgroupMax(select(0u, last_key + 1u, valid));
    var run_max = -3.402823e38;
    var run_sum = 0.0;
    for (var j = j_lo; j < j_hi; j++) {
        let row = j * l.kv_row + l.kv_head;
#for c in 0..8
        var k{c} = vec4<f32>();
        var v{c} = vec4<f32>();
        if ({c * 8}u < HD4 && {c * 8}u + lane < l.hd4) {
            k{c} = k_cache[row + {c * 8}u + lane];
            v{c} = v_cache[row + {c * 8}u + lane];
        }
#end
        var s = 0.0;
#for i in 0..64
        if ({i}u < HD4 && {i}u < l.hd4) { s += dot(q{i}, subgroupBroadcast(k{i / 8}, {i % 8}u)); }
#end
        s = softcap(s);
        let seen = valid && j >= first_key && j <= last_key;
        let new_max = select(run_max, max(run_max, s), seen);
        let corr = exp(run_max - new_max);
        let pj = select(0.0, exp(s - new_max), seen);
        run_sum = run_sum * corr + pj;
        run_max = new_max;
#for i in 0..64
        if ({i}u < HD4 && {i}u < l.hd4) { o{i} = o{i} * corr + pj * subgroupBroadcast(v{i / 8}, {i % 8}u); }
#end
    }
    if (valid) {
#for i in 0..64
        if ({i}u < HD4 && {i}u < l.hd4) { out[l.base + {i}u] = o{i} / run_sum; }
#end
        stats[l.t * p.n_heads + l.h] = vec2<f32>(run_max + log(run_sum), 0.0);
    }
}
