// Linear layer over an NF4 weight and many rows,
// in the tile128 family for GPUs (common/tile128.wgsl); the same product as matmul_nf4.wgsl.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/tile128.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // (N) or a dummy
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // (M, y_stride)

// One packed word per thread: row n of W, elements j..j+7 (j a multiple of 8, as are K and the
// block size, so the word lies in one row and one block).
fn fetch_b(c0: u32, j0: u32, lid: u32) -> Chunk {
    let at = along_j(lid);
    let n = c0 + at.x;
    let j = j0 + at.y;
    if (n >= p.n || j >= p.k) { return Chunk(vec4<f32>(0.0), vec4<f32>(0.0)); }
    let flat = n * p.k + j;
    return nf4_word(w[flat / 8u], absmax[flat / p.block_size]);
}

#include "common/matmul_forward.wgsl"
