// Input gradient through a frozen NF4 weight: dx[m, k] (+)= alpha * sum_n dy[m, n] * W(n, k),
// dequantizing W on the fly. The base weight is frozen, so it gets no gradient. Tiled: see
// common/matmul.wgsl, with the reduction over n.
#include "common/nf4.wgsl"
#include "common/params.wgsl"
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (M, dy_stride)
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (N * K / 8) packed NF4
@group(0) @binding(3) var<storage, read> absmax: array<f32>;       // (N * K / block_size)
@group(0) @binding(4) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;      // dx (M, y_stride)

// Element (n, k) of the NF4 weight, dequantized.
fn w_at(n: u32, k: u32) -> f32 {
    let flat = n * p.k + k;
    return nf4_value(w[flat / 8u], flat % 8u) * absmax[flat / p.block_size];
}

fn load_a(m: u32, n: u32) -> f32 {
    if (m >= p.m || n >= p.n) { return 0.0; }
    return dy[m * p.dy_stride + p.dy_col_offset + n];
}

fn load_b(k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) { return 0.0; }
    return w_at(n, k);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_matmul(wg, lid, p.m, p.k, p.n);
}
