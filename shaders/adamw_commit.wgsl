// After an AdamW update (adamw.wgsl): counts it in applied[0] when it was applied, that is
// when the gradient norm is finite and no loss was flagged non-finite. One thread.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> norm: array<f32>;            // (1)
@group(0) @binding(2) var<storage, read_write> applied: array<u32>;   // (1)
@group(0) @binding(3) var<storage, read> skip: array<u32>;            // (1)

@compute @workgroup_size(1)
fn main() {
    if ((bitcast<u32>(norm[0]) & 0x7f800000u) != 0x7f800000u && skip[0] == 0u) { applied[0] += 1u; }
}
