// Dense linear layer over many rows, register-tiled for CPU rasterizers (common/simd8.wgsl):
// y[m, y_col_offset + n] = alpha * sum_k x[m, k] * w[w_row(n) + k] (+ bias[n]), w's rows from
// element w_offset (or, one row, gathered: common/dense_rows.wgsl). K and the rows' offsets are
// multiples of 8 and 4. (Other adapters and shapes: matmul.wgsl.)
#include "common/params.wgsl"
#include "common/dense_rows.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;      // (M, K)
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;      // (w_offset + N * K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy when has_bias = 0
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// The one-row variants (common/simd8_one_row.wgsl) bind what they fuse in after y.
const AUX_BINDING: u32 = 5u;
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

#include "common/simd8_forward.wgsl"

fn load_w8(n: u32, j: u32) -> Eight {
    let i = w_row(n) / 4u + 2u * j;
    return Eight(w[i], w[i + 1u]);
}
