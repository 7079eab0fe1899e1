// The reduction of the matrix-vector kernels (common/matvec.wgsl) with subgroup operations, for
// the GPU families on adapters that have them: each subgroup adds its lanes' partial sums (and
// sums of squares) with subgroupAdd, its first lane puts them in workgroup memory, and after one
// barrier the thread of each output adds the subgroups' sums, where common/matvec_reduce.wgsl
// takes log2(WG) barriers. The subgroup's size is read at run time (every lane active:
// subgroupAdd(1u)), and, as in common/attention_rows.wgsl, a subgroup is taken to be a run of
// consecutive invocations, as drivers lay out a one-dimensional workgroup.
var<workgroup> red: array<f32, 576>;                               // (TM * NB + 1, WG) at most

// Adds the partial sums of all threads and writes the (TM x NB) block at (r0, c0) of a
// (n_rows, n_cols) output.
fn reduce_and_store(acc: array<f32, 32>, lid: u32, r0: u32, c0: u32, n_rows: u32, n_cols: u32) {
    let lanes = subgroupAdd(1u);
    let sg = lid / lanes;
    let first = lid % lanes == 0u;
    for (var i = 0u; i < TM * NB; i++) {
        let s = subgroupAdd(acc[i]);
        if (first) { red[i * WG + sg] = s; }
    }
    let squares = subgroupAdd(sum_sq);
    if (first) { red[TM * NB * WG + sg] = squares; }
    workgroupBarrier();
    if (lid < TM * NB) {
        let c = c0 + lid / TM;
        let r = r0 + lid % TM;
        if (c < n_cols && r < n_rows) {
            var v = 0.0;
            var q = 0.0;
            for (var g = 0u; g < (WG + lanes - 1u) / lanes; g++) {
                v += red[lid * WG + g];
                q += red[TM * NB * WG + g];
            }
            store_output(v, q, r, c);
        }
    }
}
