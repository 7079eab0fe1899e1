#include "common/block_size.wgsl"

// Block b's scale and minimum for Q4_1 (common/q4_1_code.wgsl): the shader's `absmax` holds
// the two a block, the scale first.
fn block_coeffs(b: u32) -> vec2<f32> {
    return vec2<f32>(absmax[2u * b], absmax[2u * b + 1u]);
}
