// Causal grouped-query attention in blocks of queries (FlashAttention-2's forward pass), for the
// tile128 and coop16 families: the same outputs and statistics as attention.wgsl, which runs one
// workgroup per (query, head) and so reads every key and value once per query. Here a workgroup
// takes BQ = 16 consecutive queries of one head and walks their keys in tiles of BKV = 32, each
// tile staged once in workgroup memory for all 16 queries:
//   - the 16 queries are staged too; thread (query qi = lid / 4, part pp = lid % 4) scores keys
//     pp, pp + 4, .. of the tile for its query (full dot products over the head);
//   - every thread of a query then reads the query's 32 scores and keeps the same running max
//     and sum (an online softmax), and writes the probabilities of its own 8 keys back;
//   - the value tile replaces the key tile, and each thread accumulates its quarter of the
//     head's dimensions (dims pp, pp + 4, ..) of the weighted values.
// Rows of the staged tiles are padded to head_dim + 1 floats, so the threads of a key or a query
// read distinct banks. Query t sits at position pos_offset + t and attends to keys key_start[t]
// ..= pos_offset + t, as in attention.wgsl. Needs head_dim <= 128 and 26.6 KiB of workgroup
// memory; the launcher uses attention.wgsl otherwise, and for one-token decoding steps.
#include "common/params.wgsl"
#include "common/attention_block.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (T, H * hd)
@group(0) @binding(6) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)

const BQ: u32 = 16u;
const BKV: u32 = 32u;
const MAX_HD: u32 = 128u;
const NEG: f32 = -3.402823e38;
var<workgroup> q_tile: array<f32, 2064>;                           // (BQ, MAX_HD + 1)
var<workgroup> kv_tile: array<f32, 4128>;                          // (BKV, MAX_HD + 1)
var<workgroup> scores: array<f32, 512>;                            // (BQ, BKV)
var<workgroup> key_range: vec2<u32>;                               // the block's first and last key

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = query_block(wg, lid);
    let h = blk.h;
    let t0 = blk.t0;
    let t = blk.t;
    let live = blk.live;
    let first = blk.first;
    let last = blk.last;
    let hd = p.head_dim;
    let stride = hd + 1u;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qi = lid / 4u;
    let pp = lid % 4u;
    for (var i = lid; i < BQ * hd; i += 64u) {
        let row = i / hd;
        let d = i % hd;
        var v = 0.0;
        if (t0 + row < p.n_tokens) { v = q[((t0 + row) * p.n_heads + h) * hd + d]; }
        q_tile[row * stride + d] = v;
    }
    if (lid == 0u) { key_range = block_keys(t0); }
    let range = workgroupUniformLoad(&key_range);
    var acc: array<f32, 32>;                                       // dims pp, pp + 4, .. of the head
    var run_max = NEG;
    var run_sum = 0.0;
    for (var j0 = range.x; j0 <= range.y; j0 += BKV) {
        for (var i = lid; i < BKV * hd; i += 64u) {
            let jj = i / hd;
            let d = i % hd;
            var v = 0.0;
            if (j0 + jj <= range.y) { v = k_cache[(j0 + jj) * p.kv_stride + kvh * hd + d]; }
            kv_tile[jj * stride + d] = v;
        }
        workgroupBarrier();
        for (var jj = pp; jj < BKV; jj += 4u) {
            let j = j0 + jj;
            var s = NEG;
            if (j >= first && j <= last) {
                var dot = 0.0;
                for (var d = 0u; d < hd; d++) { dot += q_tile[qi * stride + d] * kv_tile[jj * stride + d]; }
                s = softcap(dot * p.scale);
            }
            scores[qi * BKV + jj] = s;
        }
        workgroupBarrier();
        var tile_max = run_max;
        for (var jj = 0u; jj < BKV; jj++) { tile_max = max(tile_max, scores[qi * BKV + jj]); }
        workgroupBarrier();
        for (var jj = pp; jj < BKV; jj += 4u) {
            let j = j0 + jj;
            scores[qi * BKV + jj] = select(0.0, exp(scores[qi * BKV + jj] - tile_max), j >= first && j <= last);
        }
        for (var i = lid; i < BKV * hd; i += 64u) {
            let jj = i / hd;
            let d = i % hd;
            var v = 0.0;
            if (j0 + jj <= range.y) { v = v_cache[(j0 + jj) * p.kv_stride + kvh * hd + d]; }
            kv_tile[jj * stride + d] = v;
        }
        workgroupBarrier();
        let corr = exp(run_max - tile_max);
        run_sum *= corr;
        for (var jj = 0u; jj < BKV; jj++) { run_sum += scores[qi * BKV + jj]; }
        for (var r = 0u; r < 32u; r++) {
            let d = pp + 4u * r;
            if (d < hd) {
                var a = acc[r] * corr;
                for (var jj = 0u; jj < BKV; jj++) { a += scores[qi * BKV + jj] * kv_tile[jj * stride + d]; }
                acc[r] = a;
            }
        }
        run_max = tile_max;
        workgroupBarrier();
    }
    if (!live) { return; }
    let base = (t * p.n_heads + h) * hd;
    for (var r = 0u; r < 32u; r++) {
        let d = pp + 4u * r;
        if (d < hd) { out[base + d] = acc[r] / run_sum; }
    }
    if (pp == 0u) { stats[t * p.n_heads + h] = vec2<f32>(run_max + log(run_sum), 0.0); }
}
