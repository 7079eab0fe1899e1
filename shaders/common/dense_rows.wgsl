#include "common/gathered_row.wgsl"

// Where row n of a dense weight starts in `w` (a flat buffer, LoRA's for an adapter): at
// p.w_offset + n * K, or, with p.seg_rows set, gathered from up to three blocks of seg_rows
// rows each, starting at p.w_offset, p.w_offset1 and p.w_offset2: decoding's x A^T of the
// modules that read the same input (q, k and v; gate and up) in one product.
fn w_row(n: u32) -> u32 {
    if (p.seg_rows == 0u) { return p.w_offset + n * p.k; }
    return gathered_row(n, p.seg_rows, vec3<u32>(p.w_offset, p.w_offset1, p.w_offset2));
}
