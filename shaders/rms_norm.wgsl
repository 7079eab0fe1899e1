// RMSNorm as transformers computes it in f32: y = x * rsqrt(mean(x^2) + eps) * w.
// One workgroup per row.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RmsNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;      // (N, C)

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.n_rows) { return; }
    let base = row * p.dim;
    var s = 0.0;
    for (var c = lid; c < p.dim; c += 64u) {
        let v = x[base + c];
        s += v * v;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { partial[lid] += partial[lid + stride]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.dim) + p.eps);
    for (var c = lid; c < p.dim; c += 64u) {
        y[base + c] = w[c] * (x[base + c] * inv);
    }
}
