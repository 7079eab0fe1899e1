// The forward pass of a linear layer over many rows, y = x W^T: the element loaders and the
// entry point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl and the
// cooperative-matrix ones). The including shader declares `x`, `w_at(n, k)`, the weight element
// (n, k) in its storage format, and the binding numbers after y: AUX_BINDING (bound, unused, so
// that the one-row kernels' bindings are the same), LORA_H_BINDING and LORA_B_BINDING. Row m of
// x starts at m * x_stride + x_col_offset (K and 0 for a contiguous x; a LoRA B product reads its
// module's columns of an h that several modules share).
//
// With p.lora_rank > 0 a LoRA adapter's B product is fused in as more of the reduction: after
// x's K columns (padded with zeros to a step of BK) come h's rank columns, h = x A^T from a
// dispatch before (row m's at m * lora_h_stride + lora_h), against lora_scale * B (n, rank) from
// element lora_b, so that
//   y = alpha * (x W^T + lora_scale * h B^T) (+ bias) (+ y),
// one dispatch and one pass over y instead of two. The launcher sets lora_scale to the
// adapter's scale over alpha. In a pipeline made with ROWS_LORA each row has its own adapter
// instead (common/lora_table.wgsl): the B columns are p.m slots of lora_rank, one a row.

@group(0) @binding(AUX_BINDING) var<storage, read> aux: array<u32>;            // the rows' adapters (ROWS_LORA), or a dummy
@group(0) @binding(LORA_H_BINDING) var<storage, read> lora_h: array<f32>;      // h, or a dummy
@group(0) @binding(LORA_B_BINDING) var<storage, read> lora_b: array<f32>;      // B at lora_b, or a dummy

// For common/tile128.wgsl: x and W are both contiguous along k, the reduction.
const A_ALONG_ROWS: bool = false;
const B_ALONG_ROWS: bool = false;

// Where the B product's columns start in the reduction: K rounded up to a step, so that a step
// reads x and W or h and B, never both.
fn lora_start() -> u32 {
    return (p.k + BK - 1u) / BK * BK;
}

// The B product's columns: its rank, or (ROWS_LORA) a slot of lora_rank for each row.
fn lora_columns() -> u32 {
    return select(p.lora_rank, p.m * p.lora_rank, ROWS_LORA);
}

fn load_a(m: u32, k: u32) -> f32 {
    if (m >= p.m) { return 0.0; }
    if (k < p.k) { return x[m * p.x_stride + p.x_col_offset + k]; }
    let i = k - min(k, lora_start());
    if (k < lora_start() || i >= lora_columns()) { return 0.0; }
    if (!ROWS_LORA) { return lora_h[m * p.lora_h_stride + p.lora_h + i]; }
    // Row m's x A^T in its own slot, zeros in the other rows'.
    if (i / p.lora_rank != m) { return 0.0; }
    return lora_h[m * p.lora_h_stride + p.lora_h + i % p.lora_rank];
}

fn load_b(n: u32, k: u32) -> f32 {
    if (n >= p.n) { return 0.0; }
    if (k < p.k) { return w_at(n, k); }
    let i = k - min(k, lora_start());
    if (k < lora_start() || i >= lora_columns()) { return 0.0; }
    if (!ROWS_LORA) { return p.lora_scale * lora_b[p.lora_b + n * p.lora_rank + i]; }
    return lora_entry_b(lora_entry(i / p.lora_rank), n, i % p.lora_rank);
}

#include "common/lora_table.wgsl"

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_red = select(p.k, lora_start() + lora_columns(), p.lora_rank != 0u);
    tiled_matmul(wg, lid, p.m, p.n, n_red);
}
