// The NF4 weight operand of the 128 x 128 tiled cores (common/tile_fetch.wgsl), for shaders that
// declare `p` (MatmulParams), the packed words `w` and their `absmax` scales.

// The forward pass's W operand, one packed word per thread: row n, elements j..j+7 (j a
// multiple of 8, as are K and the block size, so the word lies in one row and one block).
fn fetch_nf4_along_j(c0: u32, j0: u32, lid: u32) -> Chunk {
    let at = along_j(lid);
    let n = c0 + at.x;
    let j = j0 + at.y;
    if (n >= p.n || j >= p.k) { return Chunk(vec4<f32>(0.0), vec4<f32>(0.0)); }
    let flat = n * p.k + j;
    return nf4_word(w[flat / 8u], block_coeffs(flat / BLOCK_SIZE));
}

// The input gradient's W operand, one packed word per thread: row n = j, columns k..k+7 (k a
// multiple of 8, as are K and the block size, so the word lies in one row and one block).
fn fetch_nf4_along_rows(c0: u32, j0: u32, lid: u32) -> Chunk {
    let at = along_rows(lid);
    let k = c0 + at.x;
    let n = j0 + at.y;
    if (n >= p.n || k >= p.k) { return Chunk(vec4<f32>(0.0), vec4<f32>(0.0)); }
    let flat = n * p.k + k;
    return nf4_word(w[flat / 8u], block_coeffs(flat / BLOCK_SIZE));
}
