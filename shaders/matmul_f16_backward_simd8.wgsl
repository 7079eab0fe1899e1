// Input gradient through a frozen f16 weight (packed pairs), register-tiled for CPU rasterizers
// (common/simd8_dx.wgsl). (Other adapters and shapes: matmul_f16_backward.wgsl.)
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;     // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;      // (N * K / 4): four halves each
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 5u;
const LORA_B_BINDING: u32 = 6u;

#include "common/simd8_dx.wgsl"

fn load_w4(n: u32, k: u32) -> vec4<f32> {
    let u = w[(n * p.k + k) / 4u];
    return vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y));
}
