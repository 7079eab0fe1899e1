// Linear layer over an NF4 weight and many rows,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_nf4.wgsl.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/tile128.wgsl"
#include "common/tile_nf4.wgsl"

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

// Packed words while the step is W's, element by element in a fused LoRA B product's steps.
fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk {
    if (j0 >= p.k) { return fetch_generic_b(c0, j0, lid); }
    return fetch_nf4_along_j(c0, j0, lid);
}

#include "common/matmul_forward.wgsl"
