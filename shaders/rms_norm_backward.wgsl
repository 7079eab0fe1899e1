// Backward of RMSNorm with respect to its input (the norm weights are frozen). With
// r = rsqrt(mean(x^2) + eps) and y = w * x * r:
//   dx[i] += r * w[i] * dy[i] - x[i] * r^3 / C * sum_j (w[j] * dy[j] * x[j])
// The result is ADDED to dx: the norm sits on a residual branch, and dx already holds the
// gradient that flows straight through the residual connection. One workgroup per row. Its
// operands come from common/rms_norm_grad_one.wgsl; the rms_norm_backward.pair variant swaps
// in common/rms_norm_grad_pair.wgsl, two tensors of the same width with their own weights
// (Qwen3's and Gemma 3's per-head norms of q and k, as rms_norm.pair norms them).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RmsNormParams;
#include "common/rms_norm_grad_one.wgsl"

var<workgroup> sq: array<f32, 64>;
var<workgroup> wdx: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= rows()) { return; }
    var s = 0.0;
    var d = 0.0;
    for (var c = lid; c < p.dim; c += 64u) {
        let v = x_at(row, c);
        s += v * v;
        d += wdy_at(row, c) * v;
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
        add_dx(row, c, r * wdy_at(row, c) - x_at(row, c) * k);
    }
}
