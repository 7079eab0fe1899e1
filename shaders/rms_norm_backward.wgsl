// Backward of RMSNorm with respect to its input (the norm weights are frozen). With
// r = rsqrt(mean(x^2) + eps) and y = w * x * r:
//   dx[i] += r * w[i] * dy[i] - x[i] * r^3 / C * sum_j (w[j] * dy[j] * x[j])
// The result is ADDED to dx: the norm sits on a residual branch, and dx already holds the
// gradient that flows straight through the residual connection. One workgroup per row.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RmsNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read> dy: array<f32>;           // (N, C)
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // (N, C), accumulated

var<workgroup> sq: array<f32, 64>;
var<workgroup> wdx: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.n_rows) { return; }
    let base = row * p.dim;
    var s = 0.0;
    var d = 0.0;
    for (var c = lid; c < p.dim; c += 64u) {
        let v = x[base + c];
        s += v * v;
        d += w[c] * dy[base + c] * v;
    }
    sq[lid] = s;
    wdx[lid] = d;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            sq[lid] += sq[lid + stride];
            wdx[lid] += wdx[lid + stride];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(sq[0] / f32(p.dim) + p.eps);
    let k = wdx[0] * r * r * r / f32(p.dim);
    for (var c = lid; c < p.dim; c += 64u) {
        dx[base + c] += r * w[c] * dy[base + c] - x[base + c] * k;
    }
}
