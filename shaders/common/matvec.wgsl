// Shared by the matrix-vector kernels (one row of x: decoding): the reduction epilogue. The
// including shader declares `p` (MatmulParams), `bias` and `y`.
//
// Work split: a workgroup computes NB columns of the one output row. Its 64 threads stride
// over the reduction dimension together, so neighbouring threads read neighbouring values,
// each keeping NB partial sums; a tree reduction in workgroup memory adds the 64 partials.
// (With many rows the tiled kernels of common/matmul.wgsl are far faster.) The partial sums are
// added in workgroup memory (common/matvec_reduce.wgsl), or by the GPU families with subgroup
// operations (common/matvec_reduce_subgroup.wgsl, the `.subgroup` variants).
//
// The epilogue writes y[row * y_stride + y_col_offset + col] = alpha * sum (+ bias[col]), or
// adds that to y when `accumulate` is set (LoRA's second matmul, gradient accumulation).
//
// Decoding fuses the op before a product into it (p.x_op): the kernel reads x through `x_in`,
// with `aux`, which the including shader declares after y (a dummy for X_AS_IS).
//   - X_RMS_NORM (q/k/v and gate/up after their norm): x is the raw row; x_in multiplies each
//     value by the norm's weight (aux) and sums the squares of the values the thread read.
//     Together the workgroup's threads read the row once, so their sum gives rstd =
//     rsqrt(mean(x^2) + eps), which scales the sums in the epilogue: y = rstd * sum_k w[n, k] *
//     (x[k] * aux[k]), the product of the normed row with rstd factored out. Needs TM = 1.
//   - X_SILU_MUL, X_GELU_MUL (down_proj): x is the gate's output and aux the up projection's;
//     x_in gives act(x[k]) * aux[k] (common/gates.wgsl), the gated row, never written.
// And it adds a LoRA adapter's B product in the epilogue (p.lora_rank > 0): y[col] +=
// lora_scale * sum_i lora_h[i] * B[col, i], h = x A^T from the dispatch before; the including
// shader declares `lora_h` and `lora_b` (the adapter's flat parameters) after aux.
#include "common/gates.wgsl"

const TM: u32 = 1u;
const NB: u32 = 8u;
const WG: u32 = 64u;
var<private> sum_sq: f32;                                          // the squares x_in read

// The LoRA B product's share of output (row, col): lora_scale * h[row, :] . B[col, :], or 0.
fn lora_delta(row: u32, col: u32) -> f32 {
    var d = 0.0;
    for (var i = 0u; i < p.lora_rank; i++) {
        d += lora_h[p.lora_h + row * p.lora_rank + i] * lora_b[p.lora_b + col * p.lora_rank + i];
    }
    return p.lora_scale * d;
}

// x[row, k] as the product takes it (see p.x_op above).
fn x_in(row: u32, k: u32) -> f32 {
    let i = row * p.k + k;
    let v = x[i];
    switch p.x_op {
        case X_RMS_NORM: {
            sum_sq += v * v;
            return v * aux[k];
        }
        case X_SILU_MUL: { return silu(v) * aux[i]; }
        case X_GELU_MUL: { return gelu_tanh(v) * aux[i]; }
        default: { return v; }
    }
}

// Writes output (row, col) from its sum over the reduction and the sum of the squares that
// x_in read (for X_RMS_NORM): the epilogue above.
fn store_output(sum: f32, squares: f32, row: u32, col: u32) {
    var scale = p.alpha;
    if (p.x_op == X_RMS_NORM) { scale *= inverseSqrt(squares / f32(p.k) + p.norm_eps); }
    var v = scale * sum;
    if (p.has_bias != 0u) { v += bias[col]; }
    v += lora_delta(row, col);
    let i = row * p.y_stride + p.y_col_offset + col;
    if (p.accumulate != 0u) { v += y[i]; }
    y[i] = v;
}

#include "common/matvec_reduce.wgsl"
