// Input gradient through an f16 weight,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_f16_backward.wgsl.
#include "common/params.wgsl"
#include "common/tile128.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 2) packed f16 pairs
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 5u;
const LORA_B_BINDING: u32 = 6u;

// Element (n, k) of the f16 weight (K even, so a pair never straddles a row).
fn w_at(n: u32, k: u32) -> f32 {
    let pair = unpack2x16float(w[(n * p.k + k) / 2u]);
    return select(pair.y, pair.x, (k & 1u) == 0u);
}

fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk { return fetch_generic_b(c0, j0, lid); }

#include "common/matmul_dx.wgsl"
