// Row reductions of attention_t128.wgsl without subgroup operations: every thread's value is its
// own, and the kernel combines the 16 of a row group in workgroup memory
// (common/attention_rows.wgsl is the twin with subgroup shuffles).

fn row_lanes() -> u32 {
    return 1u;
}

fn lanes_max(x: vec4<f32>, lanes: u32) -> vec4<f32> {
    return x;
}

fn lanes_sum(x: vec4<f32>, lanes: u32) -> vec4<f32> {
    return x;
}
