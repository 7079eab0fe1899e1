// Weight gradient of a dense linear layer,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_backward_w.wgsl.
#include "common/params.wgsl"
#include "common/tile128.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, N)
@group(0) @binding(2) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // flat dw

fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk { return fetch_generic_b(c0, j0, lid); }

const AUX_BINDING: u32 = 5u;
const ROWS_BINDING: u32 = 6u;

#include "common/matmul_dw.wgsl"
