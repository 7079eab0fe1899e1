// The input gradient of a linear layer over many rows, dx = dy W: the element loaders and the
// entry point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl and the
// cooperative-matrix ones), reducing over n. The including shader declares `dy`, `w_at(n, k)`,
// the weight element (n, k) in its storage format, and the binding numbers after y,
// LORA_H_BINDING and LORA_B_BINDING (common/lora_dx.wgsl).
//
// With p.lora_rank > 0 a LoRA adapter's dh A is fused in as more of the reduction: after dy's N
// columns (padded with zeros to a step of BK) come dh's lora_rank columns (row m's at
// m * lora_h_stride + lora_h) against the rows of the adapters' A matrices, gathered from up
// to three blocks of lora_seg_rows rows in `lora_b` (from elements lora_b, lora_w1 and
// lora_w2), times lora_scale, so that
//   dx = alpha * (dy W + lora_scale * dh A) (+ dx),
// one dispatch and one pass over dx instead of two. The launcher sets lora_scale to 1 / alpha.

#include "common/lora_dx.wgsl"

// For common/tile128.wgsl: dy is contiguous along n, the reduction; W along k, the output columns.
const A_ALONG_ROWS: bool = false;
const B_ALONG_ROWS: bool = true;

// Where dh's columns start in the reduction: N rounded up to a step, so that a step reads dy
// and W or dh and A, never both.
fn lora_start() -> u32 {
    return (p.n + BK - 1u) / BK * BK;
}

fn load_a(m: u32, n: u32) -> f32 {
    if (m >= p.m) { return 0.0; }
    if (n < p.n) { return dy[m * p.dy_stride + p.dy_col_offset + n]; }
    let i = n - min(n, lora_start());
    if (n < lora_start() || i >= p.lora_rank) { return 0.0; }
    return lora_h[m * p.lora_h_stride + p.lora_h + i];
}

fn load_b(k: u32, n: u32) -> f32 {
    if (k >= p.k) { return 0.0; }
    if (n < p.n) { return w_at(n, k); }
    let i = n - min(n, lora_start());
    if (n < lora_start() || i >= p.lora_rank) { return 0.0; }
    return p.lora_scale * lora_b[lora_a_row(i) + k];
}

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_red = select(p.n, lora_start() + p.lora_rank, p.lora_rank != 0u);
    tiled_matmul(wg, lid, p.m, p.k, n_red);
}
