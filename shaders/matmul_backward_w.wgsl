// Weight gradient of a dense linear layer (the LoRA A and B matrices):
//   dw[w_offset + n*K + k] (+)= alpha * sum_m dy[m, n] * x[m, k],   dy (M, N), x (M, K).
// The result lands in a flat gradient buffer at w_offset (y_stride = K, y_col_offset =
// w_offset). Tiled: see common/matmul.wgsl, with output rows n, columns k and the reduction
// over m.
#include "common/params.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, N)
@group(0) @binding(2) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // flat dw

const AUX_BINDING: u32 = 5u;
const ROWS_BINDING: u32 = 6u;

#include "common/matmul_dw.wgsl"
