// Causal attention with grouped-query heads, one workgroup per (query, head). Query t sits at
// position pos_offset + t of the key/value buffers and attends to keys key_start[t] ..=
// pos_offset + t: decoding passes key_start 0 over the KV cache; a packed training batch passes
// the first position of each token's own sample, so samples never attend to each other.
// Keys are processed in tiles of 64 with an online softmax: each thread scores one key of the
// tile and exponentiates it, then the threads split the head dimension to accumulate the
// weighted values. The softmax's log-sum-exp is stored per (query, head) for the backward pass.
//
// Queries of their own sequences (p.key_ends = 1, decoding several sequences at once): key_start
// holds each query's range of keys, (first, end), in the buffers that hold every sequence's keys,
// and the query attends to keys first .. end - 1 whatever its index; a query with no keys
// (first = end) is left alone, so that a pass over some of the rows writes only theirs.
//
// Split-key decoding (p.split_keys > 0): workgroup z takes only the query's keys z * split_keys
// up to the next slice, counted from its first key, so that a few queries over a long cache
// still fill a GPU, and writes its
// unnormalized partial into `out` (the context's scratch): per (query, head, slice) hd weighted
// sums of values, then the slice's running max and sum of exponentials. attention_combine.wgsl
// adds the slices; `stats` is not written.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T), or (T, 2) with key_ends
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (T, H * hd)
@group(0) @binding(6) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)

var<workgroup> qs: array<f32, 256>;
var<workgroup> scores: array<f32, 64>;
var<workgroup> probs: array<f32, 64>;
var<workgroup> key_range: vec2<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wg.x;
    let h = wg.y;
    let slice = wg.z;
    if (t >= p.n_tokens || h >= p.n_heads) { return; }
    let hd = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let q_base = (t * p.n_heads + h) * hd;
    for (var d = lid; d < hd; d += 64u) { qs[d] = q[q_base + d]; }
    if (lid == 0u) {
        if (p.key_ends != 0u) {
            key_range = vec2<u32>(key_start[2u * t], key_start[2u * t + 1u]);
        } else {
            key_range = vec2<u32>(key_start[t], p.pos_offset + t + 1u);
        }
    }
    let range = workgroupUniformLoad(&key_range);
    if (p.key_ends != 0u && range.x >= range.y) { return; }
    var j_start = range.x;
    var n_keys = range.y;
    if (p.split_keys > 0u) {
        j_start = range.x + slice * p.split_keys;
        n_keys = min(n_keys, j_start + p.split_keys);
    }
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);   // dims lid, lid+64, lid+128, lid+192
    var run_max = -3.402823e38;
    var run_sum = 0.0;
    for (var j0 = j_start; j0 < n_keys; j0 += 64u) {
        let j = j0 + lid;
        var s = -3.402823e38;
        if (j < n_keys) {
            let kb = j * p.kv_stride + kvh * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) { dot += qs[d] * k_cache[kb + d]; }
            s = softcap(dot * p.scale);
        }
        scores[lid] = s;
        workgroupBarrier();
        let cnt = min(64u, n_keys - j0);
        var tile_max = run_max;
        for (var i = 0u; i < cnt; i++) { tile_max = max(tile_max, scores[i]); }
        // Each thread exponentiates its own key's score once; all then read the weights.
        probs[lid] = select(0.0, exp(s - tile_max), lid < cnt);
        workgroupBarrier();
        let corr = exp(run_max - tile_max);
        run_sum *= corr;
        for (var r = 0u; r < 4u; r++) { acc[r] *= corr; }
        for (var i = 0u; i < cnt; i++) {
            let pw = probs[i];
            run_sum += pw;
            let vb = (j0 + i) * p.kv_stride + kvh * hd;
            for (var r = 0u; r < 4u; r++) {
                let d = lid + 64u * r;
                if (d < hd) { acc[r] += pw * v_cache[vb + d]; }
            }
        }
        run_max = tile_max;
        workgroupBarrier();
    }
    if (p.split_keys > 0u) {
        // A slice with no visible key (before a sliding window's start) leaves max -3.4e38, sum 0.
        let part = ((t * p.n_heads + h) * p.n_splits + slice) * (hd + 2u);
        for (var r = 0u; r < 4u; r++) {
            let d = lid + 64u * r;
            if (d < hd) { out[part + d] = acc[r]; }
        }
        if (lid == 0u) {
            out[part + hd] = run_max;
            out[part + hd + 1u] = run_sum;
        }
        return;
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + 64u * r;
        if (d < hd) { out[q_base + d] = acc[r] / run_sum; }
    }
    if (lid == 0u) { stats[t * p.n_heads + h] = vec2<f32>(run_max + log(run_sum), 0.0); }
}
