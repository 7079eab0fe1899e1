// The weight gradient of a dense linear layer, dw = dy^T x: the element loaders and the entry
// point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl), with output rows n,
// columns k and the reduction over m. The including shader declares `dy` and `x`. Row m of dy
// starts at m * dy_stride + dy_col_offset, of x at m * x_stride + x_col_offset (N, K and 0 when
// contiguous; a LoRA module's columns of an h or dh that several modules share). With p.x_op
// X_SILU_MUL or X_GELU_MUL, x is the MLP's gate and `aux` its up projection, read as
// act(gate) * up (common/gates.wgsl): down_proj's LoRA A gradient, for which the backward
// pass then writes no gated rows. With X_RMS_KEPT, x is a norm's input and the loader reads
// the normed rows as the norm wrote them, aux[k] * (x[m, k] * row_scale[m]), aux the norm's
// weight and row_scale each row's 1 / rms that the norm kept (rms_norm.keep): the LoRA A
// gradients of the modules after a norm, for which the backward pass then norms nothing again.
// The including shader declares `AUX_BINDING`, the binding after y, and `ROWS_BINDING`, the
// one after it.
#include "common/gates.wgsl"

@group(0) @binding(AUX_BINDING) var<storage, read> aux: array<f32>;         // as x, the norm's weight, or a dummy
@group(0) @binding(ROWS_BINDING) var<storage, read> row_scale: array<f32>;  // (M) with X_RMS_KEPT, or a dummy

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
    if (p.x_op == X_RMS_KEPT) { return aux[k] * (x[i] * row_scale[m]); }
    return gated(p.x_op == X_GELU_MUL, x[i], aux[i]);
}

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_matmul(wg, lid, p.n, p.k, p.m);
}
