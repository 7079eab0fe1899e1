// Attention backward, second pass, in blocks of keys (the tile128 family; the same results as
// attention_backward_kv.wgsl, which runs one workgroup per key and reads every query once per
// key). A workgroup takes BK = 16 consecutive keys of one kv head; thread (key ki = lid / 4,
// part pp = lid % 4) holds dimensions pp, pp + 4, .. of its key and value and of the dk and dv it
// accumulates, in registers. For each query head of the group and each tile of BQ = 16 queries
// (with their output gradients and the lse and delta of the first pass), staged once for the
// block:
//   - P and dS as in the first pass, each a dot product whose four parts add up through
//     workgroup memory;
//   - dv += P dout and dk += dS q for the thread's dimensions.
// Query t sees key j when key_start[t] <= j <= t; key_start never decreases along a packed
// batch, so the scan stops at the first query tile that starts past the block's samples.
// Needs head_dim <= 128 (the launcher checks it).
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

const BK: u32 = 16u;
const BQ: u32 = 16u;
var<workgroup> q_tile: array<f32, 2064>;                           // (BQ, 129)
var<workgroup> g_tile: array<f32, 2064>;                           // dout, (BQ, 129)
var<workgroup> part: array<f32, 1024>;                             // (BK, 4 parts, BQ)
var<workgroup> probs: array<f32, 256>;                             // (BK, BQ)
var<workgroup> ds: array<f32, 256>;                                // (BK, BQ)
var<workgroup> q_stats: array<vec2<f32>, 16>;
var<workgroup> q_first: array<u32, 16>;                            // key_start of each query
var<workgroup> tile_start: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let kvh = wg.y;
    let j0 = wg.x * BK;
    let hd = p.head_dim;
    let stride = hd + 1u;
    let rep = p.n_heads / p.n_kv_heads;
    let ki = lid / 4u;
    let pp = lid % 4u;
    let j = j0 + ki;
    let live = j < p.n_tokens;
    let j_last = min(j0 + BK, p.n_tokens) - 1u;
    var kr: array<f32, 32>;
    var vr: array<f32, 32>;
    var acc_k: array<f32, 32>;
    var acc_v: array<f32, 32>;
    if (live) {
        let kb = j * p.kv_stride + kvh * hd;
        for (var r = 0u; r < 32u; r++) {
            let d = pp + 4u * r;
            if (d < hd) {
                kr[r] = k[kb + d];
                vr[r] = v[kb + d];
            }
        }
    }
    for (var hr = 0u; hr < rep; hr++) {
        let h = kvh * rep + hr;
        // The first query that can see a key of this block is the block's first key.
        for (var t0 = j0; t0 < p.n_tokens; t0 += BQ) {
            workgroupBarrier();                                    // the tiles are free
            if (lid == 0u) { tile_start = key_start[t0]; }
            if (workgroupUniformLoad(&tile_start) > j_last) { break; }
            for (var i = lid; i < BQ * hd; i += 64u) {
                let qq = i / hd;
                let d = i % hd;
                var qg = vec2<f32>(0.0);
                if (t0 + qq < p.n_tokens) {
                    let at = ((t0 + qq) * p.n_heads + h) * hd + d;
                    qg = vec2<f32>(q[at], dout[at]);
                }
                q_tile[qq * stride + d] = qg.x;
                g_tile[qq * stride + d] = qg.y;
            }
            if (lid < BQ) {
                var st = vec2<f32>(0.0);
                var fk = 0xffffffffu;
                if (t0 + lid < p.n_tokens) {
                    st = stats[(t0 + lid) * p.n_heads + h];
                    fk = key_start[t0 + lid];
                }
                q_stats[lid] = st;
                q_first[lid] = fk;
            }
            workgroupBarrier();
            for (var qq = 0u; qq < BQ; qq++) {
                var s = 0.0;
                for (var r = 0u; r < 32u; r++) {
                    let d = pp + 4u * r;
                    if (d < hd) { s += kr[r] * q_tile[qq * stride + d]; }
                }
                part[(ki * 4u + pp) * BQ + qq] = s;
            }
            workgroupBarrier();
            var capg: array<f32, 4>;                               // softcap's derivative, queries pp + 4m
            for (var m = 0u; m < 4u; m++) {
                let qq = pp + 4u * m;
                let t = t0 + qq;
                let s = part[(ki * 4u) * BQ + qq] + part[(ki * 4u + 1u) * BQ + qq]
                    + part[(ki * 4u + 2u) * BQ + qq] + part[(ki * 4u + 3u) * BQ + qq];
                let seen = live && t < p.n_tokens && t >= j && q_first[qq] <= j;
                probs[ki * BQ + qq] = select(0.0, exp(softcap(s * p.scale) - q_stats[qq].x), seen);
                capg[m] = softcap_grad(s * p.scale);
            }
            workgroupBarrier();
            for (var qq = 0u; qq < BQ; qq++) {
                var g = 0.0;
                for (var r = 0u; r < 32u; r++) {
                    let d = pp + 4u * r;
                    if (d < hd) { g += vr[r] * g_tile[qq * stride + d]; }
                }
                part[(ki * 4u + pp) * BQ + qq] = g;
            }
            workgroupBarrier();
            for (var m = 0u; m < 4u; m++) {
                let qq = pp + 4u * m;
                let dp = part[(ki * 4u) * BQ + qq] + part[(ki * 4u + 1u) * BQ + qq]
                    + part[(ki * 4u + 2u) * BQ + qq] + part[(ki * 4u + 3u) * BQ + qq];
                ds[ki * BQ + qq] = probs[ki * BQ + qq] * capg[m] * (dp - q_stats[qq].y);
            }
            workgroupBarrier();
            for (var r = 0u; r < 32u; r++) {
                let d = pp + 4u * r;
                if (d < hd) {
                    var av = acc_v[r];
                    var ak = acc_k[r];
                    for (var qq = 0u; qq < BQ; qq++) {
                        av += probs[ki * BQ + qq] * g_tile[qq * stride + d];
                        ak += ds[ki * BQ + qq] * q_tile[qq * stride + d];
                    }
                    acc_v[r] = av;
                    acc_k[r] = ak;
                }
            }
        }
    }
    if (!live) { return; }
    let kb = j * p.kv_stride + kvh * hd;
    for (var r = 0u; r < 32u; r++) {
        let d = pp + 4u * r;
        if (d < hd) {
            dk[kb + d] = acc_k[r] * p.scale;
            dv[kb + d] = acc_v[r];
        }
    }
}
