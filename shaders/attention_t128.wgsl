// Causal grouped-query attention in blocks of queries (FlashAttention-2's forward pass), for the
// tiled families: the same outputs and statistics as attention.wgsl, which runs one workgroup
// per (query, head) and so reads every key and value once per query. Here a workgroup of 256
// threads takes 64 consecutive queries of one head and walks their keys in tiles of 64, with
// both products register-tiled (common/attention_tiles.wgsl: rows are queries, columns keys):
//   - S = Q K^T for the tile, a 4 x 4 block a thread;
//   - the online softmax: each query's maximum over the tile is reduced over its 16 threads
//     (subgroup shuffles where the adapter has them), the running outputs are rescaled, and the
//     probabilities written to workgroup memory; each thread keeps its own part of a query's sum
//     of probabilities, reduced the same way once at the end;
//   - O += P V, 4 queries x 8 dims a thread.
// Query t sits at position pos_offset + t and attends to keys key_start[t] ..= pos_offset + t,
// as in attention.wgsl. A head of more than 128 dims is written 128 dims at a time, each block a
// walk over the keys (common/attention_tiles.wgsl). Needs head_dim <= 256 and 25 KiB of
// workgroup memory; the launcher uses attention.wgsl otherwise, and for one-token decoding steps.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;      // (positions, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (T, H * hd)
@group(0) @binding(6) var<storage, read_write> stats: array<vec2<f32>>; // (T * H): (lse, delta)

const NEG: f32 = -3.402823e38;
var<workgroup> key_range: vec2<u32>;                               // the block's first and last key
var<private> tile: vec4<u32>;                                      // first query, first key, h, kv head

#include "common/attention_tiles.wgsl"

// Operand 0: the block's queries; 1 and 2: the tile's keys and values.
fn operand(which: u32, i: u32, d: u32) -> f32 {
    let hd = p.head_dim;
    if (which == 0u) {
        let t = tile.x + i;
        if (t >= p.n_tokens) { return 0.0; }
        return q[(t * p.n_heads + tile.z) * hd + d];
    }
    let j = tile.y + i;
    if (j > key_range.y) { return 0.0; }
    let at = j * p.kv_stride + tile.w * hd + d;
    if (which == 1u) { return k_cache[at]; }
    return v_cache[at];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lanes = row_lanes();
    let h = wg.y;
    let t0 = wg.x * 64u;
    let hd = p.head_dim;
    let tr = lid / 16u;
    let tc = lid % 16u;
    // This thread's 4 queries: each one's first and last visible key (none when past the batch).
    var first = vec4<u32>(1u);
    var last = vec4<u32>(0u);
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + 4u * tr + i;
        if (t < p.n_tokens) {
            first[i] = key_start[t];
            last[i] = p.pos_offset + t;
        }
    }
    if (lid == 0u) { key_range = block_keys(t0); }
    let range = workgroupUniformLoad(&key_range);
    for (var d0 = 0u; d0 < hd; d0 += 128u) {
        var o = array<vec4<f32>, 8>();                             // (query i, half) at 2 i + half
        var run_max = vec4<f32>(NEG);
        var run_sum = vec4<f32>(0.0);                              // this thread's part
        for (var j0 = range.x; j0 <= range.y; j0 += 64u) {
            tile = vec4<u32>(t0, j0, h, h / (p.n_heads / p.n_kv_heads));
            var s = block_product(0u, 1u, lid);
            // Scaled, capped and masked scores, and each query's maximum over the tile.
            var tile_max = vec4<f32>(NEG);
            for (var i = 0u; i < 4u; i++) {
                for (var c = 0u; c < 4u; c++) {
                    let j = j0 + 4u * tc + c;
                    var sc = NEG;
                    if (j >= first[i] && j <= last[i]) { sc = softcap(s[i][c] * p.scale); }
                    s[i][c] = sc;
                    tile_max[i] = max(tile_max[i], sc);
                }
            }
            let new_max = max(run_max, rows_max(tile_max, lid, lanes));
            let corr = exp(run_max - new_max);
            for (var i = 0u; i < 4u; i++) {
                var part = 0.0;
                for (var c = 0u; c < 4u; c++) {
                    let j = j0 + 4u * tc + c;
                    let pr = select(0.0, exp(s[i][c] - new_max[i]), j >= first[i] && j <= last[i]);
                    s[i][c] = pr;
                    part += pr;
                }
                run_sum[i] = run_sum[i] * corr[i] + part;
                o[2u * i] *= corr[i];
                o[2u * i + 1u] *= corr[i];
            }
            run_max = new_max;
            store_block_t(s, lid);
            accumulate(&o, 2u, d0, lid);
        }
        let total = rows_sum(run_sum, lid, lanes);
        for (var i = 0u; i < 4u; i++) {
            let t = t0 + 4u * tr + i;
            if (t >= p.n_tokens) { continue; }
            let base = (t * p.n_heads + h) * hd;
            for (var e = 0u; e < 4u; e++) {
                let d = d0 + 4u * tc + e;
                if (d < hd) { out[base + d] = o[2u * i][e] / total[i]; }
                if (d + 64u < hd) { out[base + d + 64u] = o[2u * i + 1u][e] / total[i]; }
            }
            if (tc == 0u && d0 == 0u) { stats[t * p.n_heads + h] = vec2<f32>(run_max[i] + log(total[i]), 0.0); }
        }
    }
}
