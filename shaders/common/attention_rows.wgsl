// Row reductions of attention_t128.wgsl with subgroup operations: the 16 threads of a row group
// (consecutive invocations) combine their values with subgroup shuffles across the lanes of a
// subgroup they share (all 16 on a GPU whose subgroups have 16 lanes or more), and the kernel
// combines what is left across subgroups in workgroup memory. The subgroup's size is read at run
// time (the active lanes, every one of them, counted); it is assumed that a subgroup is a run of
// consecutive invocations, as every driver lays out a one-dimensional workgroup.
// attention_rows_shared.wgsl is the twin for adapters without subgroup operations.

// How many consecutive threads' values lanes_max and lanes_sum combine: the subgroup's size, at
// most 16. Called by every thread of the workgroup, at the top of the kernel.
fn row_lanes() -> u32 {
    return min(subgroupAdd(1u), 16u);
}

// The maximum of x over the aligned run of `lanes` lanes this thread belongs to.
fn lanes_max(x: vec4<f32>, lanes: u32) -> vec4<f32> {
    var m = x;
    for (var mask = 1u; mask < lanes; mask <<= 1u) { m = max(m, subgroupShuffleXor(m, mask)); }
    return m;
}

// The sum of x over the aligned run of `lanes` lanes this thread belongs to.
fn lanes_sum(x: vec4<f32>, lanes: u32) -> vec4<f32> {
    var s = x;
    for (var mask = 1u; mask < lanes; mask <<= 1u) { s += subgroupShuffleXor(s, mask); }
    return s;
}
