// Linear layer over an f16 weight stored as packed pairs (two halves per u32, the lower half
// first), widened to f32 in the kernel; no shader-f16 support is needed. Used for lm_head and
// other large tables. y[m, y_col_offset + n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
// Tiled: see common/matmul.wgsl. (One row: matvec_f16.wgsl.)
#include "common/params.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 2) packed f16 pairs
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// The bindings after y (see common/matmul_forward.wgsl).
const AUX_BINDING: u32 = 5u;
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

// Element (n, k) of the f16 weight (K even, so a pair never straddles a row).
fn w_at(n: u32, k: u32) -> f32 {
    let pair = unpack2x16float(w[(n * p.k + k) / 2u]);
    return select(pair.y, pair.x, (k & 1u) == 0u);
}

#include "common/matmul_forward.wgsl"
