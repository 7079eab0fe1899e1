// Attention backward, second pass, in blocks of keys (the tiled families; the same results as
// attention_backward_kv.wgsl, which runs one workgroup per key and reads every query once per
// key). A workgroup of 256 threads takes 64 consecutive keys of one kv head and walks, for each
// query head of the group, the queries that see them in tiles of 64, the products register-tiled
// as in attention_t128.wgsl (common/attention_tiles.wgsl: rows are keys, columns queries):
//   - for each tile, S^T = K Q^T and dP^T = V dO^T, a 4 x 4 block of each a thread; then P^T
//     with the first pass's lse and dS^T = P^T (dP^T - delta) with its delta;
//   - dV += P^T dO and dK += dS^T Q, 4 keys x 8 dims of each a thread, 128 dims of the head at
//     a time (a wider head takes a walk over the queries for each block of 128, S^T and dP^T
//     computed again).
// With p.head_split (GQA on a small grid) workgroup (x, y) takes query head y alone and writes
// its share of dK and dV as partials, ((y % rep) T + key, dK or dV, Hkv * hd), into `dk`, which
// is then the context's scratch; attention_backward_kv_reduce.wgsl adds the group's shares.
// Query t sees key j when key_start[t] <= j <= t; key_start never decreases along a packed
// batch, so the scan stops at the first query tile that starts past the block's samples.
// Needs head_dim <= 256 (the launcher checks it).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<f32>;            // (T, H * hd)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (T, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read> dout: array<f32>;         // (T, H * hd)
@group(0) @binding(6) var<storage, read> stats: array<vec2<f32>>;  // (T * H): (lse, delta)
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;     // (T, Hkv * hd), or the partials
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;     // (T, Hkv * hd), unused then

var<workgroup> tile_start: u32;                                    // key_start of the tile's first query
var<private> tile: vec4<u32>;                                      // first key, first query, h, kv head

#include "common/attention_tiles.wgsl"

// Operands 0 and 2: the block's keys and values; 1 and 3: the tile's queries and output
// gradients (head tile.z).
fn operand(which: u32, i: u32, d: u32) -> f32 {
    let hd = p.head_dim;
    if (which == 0u || which == 2u) {
        let j = tile.x + i;
        if (j >= p.n_tokens) { return 0.0; }
        let at = j * p.kv_stride + tile.w * hd + d;
        if (which == 0u) { return k[at]; }
        return v[at];
    }
    let t = tile.y + i;
    if (t >= p.n_tokens) { return 0.0; }
    let at = (t * p.n_heads + tile.z) * hd + d;
    if (which == 1u) { return q[at]; }
    return dout[at];
}

// Stores g = (dk, dv) of one element: at at_k and at_v of dk (the partials) when split.
fn put(split: bool, at_k: u32, at_v: u32, g: vec2<f32>) {
    dk[at_k] = g.x;
    if (split) { dk[at_v] = g.y; } else { dv[at_v] = g.y; }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j0 = wg.x * 64u;
    let hd = p.head_dim;
    let rep = p.n_heads / p.n_kv_heads;
    let split = p.head_split == 1u;
    let kvh = select(wg.y, wg.y / rep, split);
    let hr0 = select(0u, wg.y % rep, split);                       // the query heads taken
    let hr1 = select(rep, hr0 + 1u, split);
    let tr = lid / 16u;
    let tc = lid % 16u;
    let j_last = min(j0 + 64u, p.n_tokens) - 1u;
    for (var d0 = 0u; d0 < hd; d0 += 128u) {
        var acc_k = array<vec4<f32>, 8>();                         // (key i, half) at 2 i + half
        var acc_v = array<vec4<f32>, 8>();
        for (var hr = hr0; hr < hr1; hr++) {
            let h = kvh * rep + hr;
            // The first query that can see a key of this block is the block's first key.
            for (var t0 = j0; t0 < p.n_tokens; t0 += 64u) {
                if (lid == 0u) { tile_start = key_start[t0]; }
                if (workgroupUniformLoad(&tile_start) > j_last) { break; }
                tile = vec4<u32>(j0, t0, h, kvh);
                let st = block_product(0u, 1u, lid);
                let dpt = block_product(2u, 3u, lid);
                // This thread's 4 queries: lse, delta and the first key each sees.
                var qs: array<vec2<f32>, 4>;
                var first = vec4<u32>(0xffffffffu);
                for (var c = 0u; c < 4u; c++) {
                    let t = t0 + 4u * tc + c;
                    if (t < p.n_tokens) {
                        qs[c] = stats[t * p.n_heads + h];
                        first[c] = key_start[t];
                    }
                }
                var pm: array<vec4<f32>, 4>;
                var ds: array<vec4<f32>, 4>;
                for (var i = 0u; i < 4u; i++) {
                    let j = j0 + 4u * tr + i;
                    for (var c = 0u; c < 4u; c++) {
                        let t = t0 + 4u * tc + c;
                        let seen = j < p.n_tokens && t < p.n_tokens && t >= j && first[c] <= j;
                        let x = st[i][c] * p.scale;
                        let pr = select(0.0, exp(softcap(x) - qs[c].x), seen);
                        pm[i][c] = pr;
                        ds[i][c] = pr * softcap_grad(x) * (dpt[i][c] - qs[c].y);
                    }
                }
                store_block_t(pm, lid);
                accumulate(&acc_v, 3u, d0, lid);
                store_block_t(ds, lid);
                accumulate(&acc_k, 1u, d0, lid);
            }
        }
        for (var i = 0u; i < 4u; i++) {
            let j = j0 + 4u * tr + i;
            if (j >= p.n_tokens) { continue; }
            var at_k = j * p.kv_stride + kvh * hd;
            var at_v = at_k;
            if (split) {
                at_k = (hr0 * p.n_tokens + j) * 2u * p.kv_stride + kvh * hd;
                at_v = at_k + p.kv_stride;
            }
            for (var e = 0u; e < 4u; e++) {
                let d = d0 + 4u * tc + e;
                if (d < hd) { put(split, at_k + d, at_v + d, vec2<f32>(acc_k[2u * i][e] * p.scale, acc_v[2u * i][e])); }
                if (d + 64u < hd) {
                    put(split, at_k + d + 64u, at_v + d + 64u, vec2<f32>(acc_k[2u * i + 1u][e] * p.scale, acc_v[2u * i + 1u][e]));
                }
            }
        }
    }
}
