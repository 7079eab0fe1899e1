// Shared by every matmul kernel (forward, dX and dW): the params struct and the reduction
// epilogue. The including shader declares `p`, `bias` and `y`.
//
// Work split: a workgroup computes a (TM rows) x (NB columns) block of its output. Its 64
// threads stride over the reduction dimension together, so neighbouring threads read
// neighbouring values (coalesced on GPUs, vector loads on CPU rasterizers), each keeping
// TM*NB partial sums; a tree reduction in workgroup memory adds the 64 partials.
//
// The epilogue writes y[row * y_stride + y_col_offset + col] = alpha * sum (+ bias[col]), or
// adds that to y when `accumulate` is set (LoRA's second matmul, gradient accumulation).
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    y_stride: u32,
    y_col_offset: u32,
    block_size: u32,
    accumulate: u32,
    alpha: f32,
    w_offset: u32,      // first element of w (LoRA matrices live in one flat buffer)
    dy_stride: u32,     // dX kernels: row stride of dy
    dy_col_offset: u32, // dX kernels: first column of dy
}

const TM: u32 = 4u;
const NB: u32 = 8u;
const WG: u32 = 64u;
var<workgroup> red: array<f32, 2048>;                              // (TM * NB, WG)

// Adds the partial sums of all threads and writes the (TM x NB) block at (r0, c0) of a
// (n_rows, n_cols) output.
fn reduce_and_store(acc: array<f32, 32>, lid: u32, r0: u32, c0: u32, n_rows: u32, n_cols: u32) {
    for (var i = 0u; i < TM * NB; i++) { red[i * WG + lid] = acc[i]; }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i < TM * NB; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
        }
        workgroupBarrier();
    }
    if (lid < TM * NB) {
        let c = c0 + lid / TM;
        let r = r0 + lid % TM;
        if (c < n_cols && r < n_rows) {
            var v = p.alpha * red[lid * WG];
            if (p.has_bias != 0u) { v += bias[c]; }
            let i = r * p.y_stride + p.y_col_offset + c;
            if (p.accumulate != 0u) { v += y[i]; }
            y[i] = v;
        }
    }
}
