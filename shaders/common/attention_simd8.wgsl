// Shared by the attention kernels for CPU rasterizers (attention_simd8.wgsl and
// attention_backward_q_simd8.wgsl): which query a lane owns. A workgroup is one subgroup of 8
// lanes over 8 consecutive queries of head wg.y; lanes past the last query load query T-1 and
// store nothing. Rows are indexed in vec4s.

const HD4: u32 = 32u;   // vec4s per head the kernel is unrolled for, at most 64 (variants override it)

struct QueryLane {
    h: u32,
    t: u32,
    valid: bool,
    tq: u32,        // t, clamped to a real query for loads
    hd4: u32,       // vec4s per head
    kv_row: u32,    // vec4s per key/value position
    kv_head: u32,   // first vec4 of this head's kv head within a position
    base: u32,      // first vec4 of this query's head in q, out and their gradients
}

fn query_lane(wg: vec3<u32>, lane: u32) -> QueryLane {
    var l: QueryLane;
    l.h = wg.y;
    l.t = wg.x * 8u + lane;
    l.valid = l.t < p.n_tokens;
    l.tq = min(l.t, p.n_tokens - 1u);
    l.hd4 = p.head_dim / 4u;
    l.kv_row = p.kv_stride / 4u;
    l.kv_head = (l.h / (p.n_heads / p.n_kv_heads)) * l.hd4;
    l.base = (l.tq * p.n_heads + l.h) * l.hd4;
    return l;
}
