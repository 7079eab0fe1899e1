// Input gradient through a frozen NF4 weight, register-tiled for CPU rasterizers
// (common/simd8_dx.wgsl). (Other adapters and shapes: matmul_nf4_backward.wgsl.)
#include "common/nf4.wgsl"
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;     // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

#include "common/simd8_dx.wgsl"

// Elements (n, k..k+3), k % 4 == 0: half of one packed word, under one scale.
fn load_w4(n: u32, k: u32) -> vec4<f32> {
    let flat = n * p.k + k;
    let c = block_coeffs(flat / BLOCK_SIZE);
    return nf4_vec4(w[flat / 8u], flat % 8u) * c.x + c.y;
}
