// Where row n of a dense weight starts in `w` (a flat buffer, LoRA's for an adapter): at
// p.w_offset + n * K, or, with p.seg_rows set, gathered from up to three blocks of seg_rows
// rows each, starting at p.w_offset, p.w_offset1 and p.w_offset2: decoding's x A^T of the
// modules that read the same input (q, k and v; gate and up) in one product.
fn w_row(n: u32) -> u32 {
    if (p.seg_rows == 0u) { return p.w_offset + n * p.k; }
    let block = n / p.seg_rows;
    var first = p.w_offset;
    if (block == 1u) { first = p.w_offset1; }
    if (block == 2u) { first = p.w_offset2; }
    return first + (n % p.seg_rows) * p.k;
}
