// Input gradient through a frozen NF4 weight,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_nf4_backward.wgsl.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/tile128.wgsl"
#include "common/tile_nf4.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// The bindings after y: a fused dh A's operands (common/lora_dx.wgsl).
const LORA_H_BINDING: u32 = 6u;
const LORA_B_BINDING: u32 = 7u;

// Packed words while the step is W's, element by element in a fused dh A's steps.
fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk {
    if (j0 >= p.n) { return fetch_generic_b(c0, j0, lid); }
    return fetch_nf4_along_rows(c0, j0, lid);
}

#include "common/matmul_dx.wgsl"
