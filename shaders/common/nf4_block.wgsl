#include "common/block_size.wgsl"

// Block b's scale and minimum: a value is its code times the scale plus the minimum (0 for NF4
// and Q4_0). The shader declares `absmax`, one scale a block.
fn block_coeffs(b: u32) -> vec2<f32> {
    return vec2<f32>(absmax[b], 0.0);
}
