// Linear layer over an NF4 weight and many rows, dequantized on the fly:
// y[m, n] = sum_k x[m, k] * NF4_CODE[q(n, k)] * absmax[(n*K + k) / block_size] (+ bias[n]).
// The weight never leaves 4 bits in GPU memory: each element is dequantized once per workgroup
// as the tile is staged. Tiled: see common/matmul.wgsl. (One row: matvec_nf4.wgsl.)
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// The bindings after y (see common/matmul_forward.wgsl).
const AUX_BINDING: u32 = 6u;
const LORA_H_BINDING: u32 = 7u;
const LORA_B_BINDING: u32 = 8u;

#include "common/matmul_forward.wgsl"
