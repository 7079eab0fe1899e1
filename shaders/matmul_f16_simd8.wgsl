// Linear layer over an f16 weight (packed pairs, the lower half first) and many rows,
// register-tiled for CPU rasterizers (common/simd8.wgsl). K is a multiple of 8.
// (Other adapters and shapes: matmul_f16.wgsl.)
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;      // (M, K)
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;      // (N * K / 8): eight halves each
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// The one-row variants (common/simd8_one_row.wgsl) bind what they fuse in after y.
const AUX_BINDING: u32 = 5u;
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

#include "common/simd8_forward.wgsl"

fn load_w8(n: u32, j: u32) -> Eight {
    let u = w[n * (p.k / 8u) + j];
    return Eight(
        vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y)),
        vec4<f32>(unpack2x16float(u.z), unpack2x16float(u.w)),
    );
}
