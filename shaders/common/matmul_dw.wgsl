// The weight gradient of a dense linear layer, dw = dy^T x: the element loaders and the entry
// point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl), with output rows n,
// columns k and the reduction over m. The including shader declares `dy` and `x`. Row m of dy
// starts at m * dy_stride + dy_col_offset, of x at m * x_stride + x_col_offset (N, K and 0 when
// contiguous; a LoRA module's columns of an h or dh that several modules share). With p.x_op
// X_SILU_MUL or X_GELU_MUL, x is the MLP's gate and `aux` its up projection, read as
// act(gate) * up (common/gates.wgsl): down_proj's LoRA A gradient, for which the backward
// pass then writes no gated rows. The including shader declares `AUX_BINDING`, the binding
// after y.
#include "common/gates.wgsl"

@group(0) @binding(AUX_BINDING) var<storage, read> aux: array<f32>;  // as x, or a dummy

// Both operands are contiguous along their rows (n, k), not along the reduction (m).
const A_ALONG_ROWS: bool = true;
const B_ALONG_ROWS: bool = true;

fn load_a(n: u32, m: u32) -> f32 {
    if (n >= p.n || m >= p.m) { return 0.0; }
    return dy[m * p.dy_stride + p.dy_col_offset + n];
}

fn load_b(k: u32, m: u32) -> f32 {
    if (k >= p.k || m >= p.m) { return 0.0; }
    let i = m * p.x_stride + p.x_col_offset + k;
    if (p.x_op == X_AS_IS) { return x[i]; }
    return gated(p.x_op == X_GELU_MUL, x[i], aux[i]);
}

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_matmul(wg, lid, p.n, p.k, p.m);
}
