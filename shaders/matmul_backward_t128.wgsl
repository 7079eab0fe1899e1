// Input gradient of a dense linear layer,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_backward.wgsl.
#include "common/params.wgsl"
#include "common/dense_rows.wgsl"
#include "common/tile128.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (w_offset + N * K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 5u;
const LORA_B_BINDING: u32 = 6u;

// Element (n, k) of the dense weight, which starts at w_offset (LoRA matrices share one buffer),
// or whose rows are gathered from up to three blocks (common/dense_rows.wgsl).
fn w_at(n: u32, k: u32) -> f32 {
    return w[w_row(n) + k];
}

fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk { return fetch_generic_b(c0, j0, lid); }

#include "common/matmul_dx.wgsl"
