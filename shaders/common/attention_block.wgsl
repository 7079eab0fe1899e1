// A block of BQ = 16 consecutive queries of one head, as the tile128 attention kernels
// (attention_t128.wgsl, attention_backward_q_t128.wgsl) take them: workgroup (x, y) holds
// queries 16x.. of head y, and thread (qi = lid / 4, pp = lid % 4) part pp of query qi. Query t
// sits at position pos_offset + t and sees keys key_start[t] ..= pos_offset + t. The including
// shader declares `p` (AttentionParams) and `key_start`.

struct QueryBlock {
    h: u32,
    t0: u32,
    // This thread's query, whether it is in the batch, and the keys it sees (none when not).
    t: u32,
    live: bool,
    first: u32,
    last: u32,
}

fn query_block(wg: vec3<u32>, lid: u32) -> QueryBlock {
    let t0 = wg.x * 16u;
    let t = t0 + lid / 4u;
    let live = t < p.n_tokens;
    var b = QueryBlock(wg.y, t0, t, live, 1u, 0u);
    if (live) {
        b.first = key_start[t];
        b.last = p.pos_offset + t;
    }
    return b;
}

// The keys any query of the block sees, first ..= last (key_start is not assumed monotonic).
fn block_keys(t0: u32) -> vec2<u32> {
    let t_last = min(t0 + 16u, p.n_tokens) - 1u;
    var lo = key_start[t0];
    for (var r = t0 + 1u; r <= t_last; r++) { lo = min(lo, key_start[r]); }
    return vec2<u32>(lo, p.pos_offset + t_last);
}
