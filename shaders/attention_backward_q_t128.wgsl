// Attention backward, first pass, in blocks of queries (the tiled families; the same results as
// attention_backward_q.wgsl, which runs one workgroup per query and reads every key and value
// once per query). A workgroup of 256 threads takes 64 consecutive queries of one head and walks
// their keys in tiles of 64, the products register-tiled as in attention_t128.wgsl
// (common/attention_tiles.wgsl: rows are queries, columns keys):
//   - delta = dout . out per query, its 16 threads' parts reduced first, and stored next to lse
//     for the second pass;
//   - for each tile, S = Q K^T and dP = dO V^T, a 4 x 4 block of each a thread; then
//     P = exp(scale s - lse) (the forward pass's softmax) and dS = P (dP - delta);
//   - dQ += dS K, 4 queries x 8 dims a thread, 128 dims of the head at a time (a wider head
//     takes a walk over the keys for each block of 128, scores and dP computed again).
// Keys, positions and the key_start rule are those of attention.wgsl, with pos_offset 0.
// Needs head_dim <= 256 (the launcher checks it).
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

var<workgroup> key_range: vec2<u32>;                               // the block's first and last key
var<private> tile: vec4<u32>;                                      // first query, first key, h, kv head

#include "common/attention_tiles.wgsl"

// Operands 0 and 2: the block's queries and output gradients; 1 and 3: the tile's keys and values.
fn operand(which: u32, i: u32, d: u32) -> f32 {
    let hd = p.head_dim;
    if (which == 0u || which == 2u) {
        let t = tile.x + i;
        if (t >= p.n_tokens) { return 0.0; }
        let at = (t * p.n_heads + tile.z) * hd + d;
        if (which == 0u) { return q[at]; }
        return dout[at];
    }
    let j = tile.y + i;
    if (j > key_range.y) { return 0.0; }
    let at = j * p.kv_stride + tile.w * hd + d;
    if (which == 1u) { return k[at]; }
    return v[at];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lanes = row_lanes();
    let h = wg.y;
    let t0 = wg.x * 64u;
    let hd = p.head_dim;
    let tr = lid / 16u;
    let tc = lid % 16u;
    // This thread's 4 queries: the keys each sees, its lse, and its part of dout . out.
    var first = vec4<u32>(1u);
    var last = vec4<u32>(0u);
    var lse = vec4<f32>(0.0);
    var part = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + 4u * tr + i;
        if (t < p.n_tokens) {
            first[i] = key_start[t];
            last[i] = t;
            lse[i] = stats[t * p.n_heads + h].x;
            let base = (t * p.n_heads + h) * hd;
            for (var e = 0u; e < 4u; e++) {
                for (var d = 4u * tc + e; d < hd; d += 64u) { part[i] += dout[base + d] * out[base + d]; }
            }
        }
    }
    let delta = rows_sum(part, lid, lanes);
    if (lid == 0u) { key_range = block_keys(t0); }
    let range = workgroupUniformLoad(&key_range);
    for (var d0 = 0u; d0 < hd; d0 += 128u) {
        var acc = array<vec4<f32>, 8>();                           // (query i, half) at 2 i + half
        for (var j0 = range.x; j0 <= range.y; j0 += 64u) {
            tile = vec4<u32>(t0, j0, h, h / (p.n_heads / p.n_kv_heads));
            let s = block_product(0u, 1u, lid);
            let dp = block_product(2u, 3u, lid);
            var ds: array<vec4<f32>, 4>;
            for (var i = 0u; i < 4u; i++) {
                for (var c = 0u; c < 4u; c++) {
                    let j = j0 + 4u * tc + c;
                    let x = s[i][c] * p.scale;
                    let pr = select(0.0, exp(softcap(x) - lse[i]), j >= first[i] && j <= last[i]);
                    ds[i][c] = pr * softcap_grad(x) * (dp[i][c] - delta[i]);
                }
            }
            store_block_t(ds, lid);
            accumulate(&acc, 1u, d0, lid);
        }
        for (var i = 0u; i < 4u; i++) {
            let t = t0 + 4u * tr + i;
            if (t >= p.n_tokens) { continue; }
            let base = (t * p.n_heads + h) * hd;
            for (var e = 0u; e < 4u; e++) {
                let d = d0 + 4u * tc + e;
                if (d < hd) { dq[base + d] = acc[2u * i][e] * p.scale; }
                if (d + 64u < hd) { dq[base + d + 64u] = acc[2u * i + 1u][e] * p.scale; }
            }
            if (tc == 0u && d0 == 0u) { stats[t * p.n_heads + h] = vec2<f32>(lse[i], delta[i]); }
        }
    }
}
