// Input gradient of a dense linear layer, register-tiled for CPU rasterizers
// (common/simd8_dx.wgsl): dx[m, y_col_offset + k] (+)= alpha * sum_n dy[m, dy_col_offset + n] *
// w[w_row(n) + k] (gathered rows: common/dense_rows.wgsl). (Other adapters and shapes:
// matmul_backward.wgsl.)
#include "common/params.wgsl"
#include "common/dense_rows.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;     // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;      // (w_offset + N * K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 5u;
const LORA_B_BINDING: u32 = 6u;

#include "common/simd8_dx.wgsl"

fn load_w4(n: u32, k: u32) -> vec4<f32> {
    return w[(w_row(n) + k) / 4u];
}
