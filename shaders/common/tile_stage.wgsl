// How the tile128 and tile64 cores stage a fetched chunk (common/tile_fetch.wgsl): both operands
// transposed, (BK, BR) with each row padded by 4 floats, as vec4s `a_tile` and `b_tile` of
// STRIDE4 = (BR + 4) / 4 a row, which the including core declares.

// Stores a chunk into a staged tile (a_tile when `is_a`): along j it is one column of 8 rows of
// the transposed tile, along rows 8 consecutive floats of one row.
fn put(is_a: bool, along: bool, lid: u32, c: Chunk) {
    if (along) {
        let at = along_rows(lid);
        let i = at.y * STRIDE4 + at.x / 4u;
        if (is_a) { a_tile[i] = c.lo; a_tile[i + 1u] = c.hi; } else { b_tile[i] = c.lo; b_tile[i + 1u] = c.hi; }
        return;
    }
    let at = along_j(lid);
    for (var e = 0u; e < 8u; e++) {
        let v = select(c.hi[e % 4u], c.lo[e % 4u], e < 4u);
        let i = (at.y + e) * STRIDE4 + at.x / 4u;
        if (is_a) { a_tile[i][at.x % 4u] = v; } else { b_tile[i][at.x % 4u] = v; }
    }
}

