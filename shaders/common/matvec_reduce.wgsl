// The reduction of the matrix-vector kernels (common/matvec.wgsl) in workgroup memory alone,
// for every adapter: each thread's partial sums (and sum of squares) go to workgroup memory and
// a tree of log2(WG) steps, a barrier each, adds them. common/matvec_reduce_subgroup.wgsl is
// the same with subgroup operations.
var<workgroup> red: array<f32, 2048>;                              // (TM * NB + 1, WG)

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
    if (lid < TM * NB) {
        let c = c0 + lid / TM;
        let r = r0 + lid % TM;
        if (c < n_cols && r < n_rows) { store_output(red[lid * WG], red[TM * NB * WG], r, c); }
    }
}
