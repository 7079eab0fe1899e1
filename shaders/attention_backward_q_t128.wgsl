// Attention backward, first pass, in blocks of queries (the tile128 family; the same results as
// attention_backward_q.wgsl, which runs one workgroup per query and reads every key and value
// once per query). A workgroup takes BQ = 16 consecutive queries of one head; thread
// (query qi = lid / 4, part pp = lid % 4) holds dimensions pp, pp + 4, .. of its query, of the
// query's output gradient and of the query gradient it accumulates, all in registers. For each
// tile of BKV = 16 keys, staged once for the block together with the values:
//   - every thread dots its dimensions of q and of dout with each key and value of the tile; the
//     four parts of a query add their partial sums through workgroup memory;
//   - P = exp(scale s - lse) (the forward pass's softmax), dS = P (dout . v - delta), with
//     delta = dout . out per query, computed first and stored next to lse for the second pass;
//   - dq += dS k for the thread's dimensions.
// Keys, positions and the key_start rule are those of attention.wgsl, with pos_offset 0.
// Needs head_dim <= 128 (the launcher checks it).
#include "common/params.wgsl"
#include "common/attention_block.wgsl"

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

const BQ: u32 = 16u;
const BKV: u32 = 16u;
var<workgroup> k_tile: array<f32, 2064>;                           // (BKV, 129)
var<workgroup> v_tile: array<f32, 2064>;
var<workgroup> part: array<f32, 1024>;                             // (BQ, 4 parts, BKV)
var<workgroup> ds: array<f32, 256>;                                // (BQ, BKV)
var<workgroup> key_range: vec2<u32>;

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
    var qr: array<f32, 32>;
    var gr: array<f32, 32>;
    var acc: array<f32, 32>;
    var dsum = 0.0;
    if (live) {
        let base = (t * p.n_heads + h) * hd;
        for (var r = 0u; r < 32u; r++) {
            let d = pp + 4u * r;
            if (d < hd) {
                qr[r] = q[base + d];
                gr[r] = dout[base + d];
                dsum += gr[r] * out[base + d];
            }
        }
    }
    // delta = dout . out: the four parts of each query add theirs.
    part[lid] = dsum;
    if (lid == 0u) { key_range = block_keys(t0); }
    let range = workgroupUniformLoad(&key_range);
    let delta = part[qi * 4u] + part[qi * 4u + 1u] + part[qi * 4u + 2u] + part[qi * 4u + 3u];
    var lse = 0.0;
    if (live) { lse = stats[t * p.n_heads + h].x; }
    for (var j0 = range.x; j0 <= range.y; j0 += BKV) {
        workgroupBarrier();                                        // part and the tiles are free
        for (var i = lid; i < BKV * hd; i += 64u) {
            let jj = i / hd;
            let d = i % hd;
            var kv = vec2<f32>(0.0);
            if (j0 + jj <= range.y) {
                let at = (j0 + jj) * p.kv_stride + kvh * hd + d;
                kv = vec2<f32>(k[at], v[at]);
            }
            k_tile[jj * stride + d] = kv.x;
            v_tile[jj * stride + d] = kv.y;
        }
        workgroupBarrier();
        // Scores: partial dot products of this thread's dimensions, then the four parts added.
        for (var jj = 0u; jj < BKV; jj++) {
            var s = 0.0;
            for (var r = 0u; r < 32u; r++) {
                let d = pp + 4u * r;
                if (d < hd) { s += qr[r] * k_tile[jj * stride + d]; }
            }
            part[(qi * 4u + pp) * BKV + jj] = s;
        }
        workgroupBarrier();
        var probs: array<f32, 4>;                                  // keys pp, pp + 4, pp + 8, pp + 12
        var capg: array<f32, 4>;                                   // softcap's derivative at them
        for (var m = 0u; m < 4u; m++) {
            let jj = pp + 4u * m;
            let j = j0 + jj;
            let s = part[(qi * 4u) * BKV + jj] + part[(qi * 4u + 1u) * BKV + jj]
                + part[(qi * 4u + 2u) * BKV + jj] + part[(qi * 4u + 3u) * BKV + jj];
            probs[m] = select(0.0, exp(softcap(s * p.scale) - lse), j >= first && j <= last);
            capg[m] = softcap_grad(s * p.scale);
        }
        workgroupBarrier();
        for (var jj = 0u; jj < BKV; jj++) {
            var g = 0.0;
            for (var r = 0u; r < 32u; r++) {
                let d = pp + 4u * r;
                if (d < hd) { g += gr[r] * v_tile[jj * stride + d]; }
            }
            part[(qi * 4u + pp) * BKV + jj] = g;
        }
        workgroupBarrier();
        for (var m = 0u; m < 4u; m++) {
            let jj = pp + 4u * m;
            let dp = part[(qi * 4u) * BKV + jj] + part[(qi * 4u + 1u) * BKV + jj]
                + part[(qi * 4u + 2u) * BKV + jj] + part[(qi * 4u + 3u) * BKV + jj];
            ds[qi * BKV + jj] = probs[m] * capg[m] * (dp - delta);
        }
        workgroupBarrier();
        for (var r = 0u; r < 32u; r++) {
            let d = pp + 4u * r;
            if (d < hd) {
                var a = acc[r];
                for (var jj = 0u; jj < BKV; jj++) { a += ds[qi * BKV + jj] * k_tile[jj * stride + d]; }
                acc[r] = a;
            }
        }
    }
    if (!live) { return; }
    let base = (t * p.n_heads + h) * hd;
    for (var r = 0u; r < 32u; r++) {
        let d = pp + 4u * r;
        if (d < hd) { dq[base + d] = acc[r] * p.scale; }
    }
    if (pp == 0u) { stats[t * p.n_heads + h] = vec2<f32>(lse, delta); }
}
