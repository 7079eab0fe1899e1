// Linear layer over an NF4 weight and many rows, register-tiled for CPU rasterizers
// (common/simd8.wgsl); each packed word is loaded and decoded once per workgroup.
// (Other adapters: matmul_nf4.wgsl.)
#include "common/nf4.wgsl"
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;      // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// The one-row variants (common/simd8_one_row.wgsl) bind what they fuse in after y.
const AUX_BINDING: u32 = 6u;
const LORA_H_BINDING: u32 = 7u;
const LORA_B_BINDING: u32 = 8u;

#include "common/simd8_forward.wgsl"

// Words never straddle an NF4 block (BLOCK_SIZE % 8 == 0), so one scale serves all eight.
fn load_w8(n: u32, j: u32) -> Eight {
    let word = n * (p.k / 8u) + j;
    let c = block_coeffs(word / (BLOCK_SIZE / 8u));
    return Eight(nf4_vec4(w[word], 0u) * c.x + c.y, nf4_vec4(w[word], 4u) * c.x + c.y);
}
