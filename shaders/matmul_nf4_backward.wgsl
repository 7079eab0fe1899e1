// Input gradient through a frozen NF4 weight: dx[m, k] (+)= alpha * sum_n dy[m, n] * W(n, k),
// dequantizing W on the fly. The base weight is frozen, so it gets no gradient. Tiled: see
// common/matmul.wgsl, with the reduction over n.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

#include "common/matmul_dx.wgsl"
