// Shared by the matrix-vector kernels (one row of x: decoding): the reduction epilogue. The
// including shader declares `p` (MatmulParams), `bias` and `y`.
//
// Work split: a workgroup computes NB columns of the one output row. Its 64 threads stride
// over the reduction dimension together, so neighbouring threads read neighbouring values,
// each keeping NB partial sums; a tree reduction in workgroup memory adds the 64 partials.
// (With many rows the tiled kernels of common/matmul.wgsl are far faster.)
//
// The epilogue writes y[row * y_stride + y_col_offset + col] = alpha * sum (+ bias[col]), or
// adds that to y when `accumulate` is set (LoRA's second matmul, gradient accumulation).
//
// With p.row_norm the RMSNorm before the product is fused into it (decoding's q/k/v and
// gate/up products): x is the raw row, which the kernel reads through `x_in`. That multiplies
// each value by the norm's weight (`norm_w`, which the including shader declares after y, or a
// dummy) and sums the squares of the values the thread read; together the workgroup's threads
// read the row once, so their sum gives rstd = rsqrt(mean(x^2) + eps), which scales the sums in
// the epilogue: y = rstd * sum_k w[n, k] * (x[k] * norm_w[k]), the product of the normed row
// (x * rstd * norm_w) and w with rstd factored out. Needs TM = 1.

const TM: u32 = 1u;
const NB: u32 = 8u;
const WG: u32 = 64u;
var<workgroup> red: array<f32, 2048>;                              // (TM * NB + 1, WG)
var<private> sum_sq: f32;                                          // the squares x_in read

// x[row, k], times norm_w[k] when the product norms its input.
fn x_in(row: u32, k: u32) -> f32 {
    let v = x[row * p.k + k];
    if (p.row_norm == 0u) { return v; }
    sum_sq += v * v;
    return v * norm_w[k];
}

// Adds the partial sums of all threads and writes the (TM x NB) block at (r0, c0) of a
// (n_rows, n_cols) output.
fn reduce_and_store(acc: array<f32, 32>, lid: u32, r0: u32, c0: u32, n_rows: u32, n_cols: u32) {
    for (var i = 0u; i < TM * NB; i++) { red[i * WG + lid] = acc[i]; }
    red[TM * NB * WG + lid] = sum_sq;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i <= TM * NB; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
        }
        workgroupBarrier();
    }
    var scale = p.alpha;
    if (p.row_norm != 0u) { scale *= inverseSqrt(red[TM * NB * WG] / f32(p.k) + p.norm_eps); }
    if (lid < TM * NB) {
        let c = c0 + lid / TM;
        let r = r0 + lid % TM;
        if (c < n_cols && r < n_rows) {
            var v = scale * red[lid * WG];
            if (p.has_bias != 0u) { v += bias[c]; }
            let i = r * p.y_stride + p.y_col_offset + c;
            if (p.accumulate != 0u) { v += y[i]; }
            y[i] = v;
        }
    }
}
