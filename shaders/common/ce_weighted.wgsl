// Each row of cross_entropy_backward.wgsl carries its own weight, d loss / d CE[row] (DPO:
// written by dpo.wgsl); the rows of this chunk start at p.row_offset of the batch.
@group(0) @binding(4) var<storage, read> weights: array<f32>; // (T of the whole batch)
fn row_weight(row: u32) -> f32 { return weights[p.row_offset + row]; }
