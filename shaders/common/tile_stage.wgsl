// How the tile128 and tile64 cores stage a fetched chunk (common/tile_fetch.wgsl): both operands
// transposed, (BK, BR) with each row padded by 4 floats (BR and BK the core's), as vec4s: 17 KiB
// for tile128's blocks of 128, 8.5 KiB for tile64's of 64.

const STRIDE4: u32 = (BR + 4u) / 4u;                               // vec4s per staged row
var<workgroup> a_tile: array<vec4<f32>, BK * STRIDE4>;
var<workgroup> b_tile: array<vec4<f32>, BK * STRIDE4>;

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

