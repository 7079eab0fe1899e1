// RMSNorm as transformers computes it in f32: y = x * rsqrt(mean(x^2) + eps) * w.
// One workgroup per row. Its operands come from common/rms_norm_one.wgsl; the rms_norm.pair
// variant swaps in common/rms_norm_pair.wgsl, which norms two tensors of the same width with
// their own weights in one dispatch (Qwen3's and Gemma 3's per-head norms of q and k). The
// rms_norm.keep variant also keeps each row's 1 / rms (common/rms_norm_inv_kept.wgsl).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RmsNormParams;
#include "common/rms_norm_one.wgsl"
#include "common/rms_norm_inv.wgsl"

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= rows()) { return; }
    var s = 0.0;
    for (var c = lid; c < p.dim; c += 64u) {
        let v = x_at(row, c);
        s += v * v;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { partial[lid] += partial[lid + stride]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.dim) + p.eps);
    if (lid == 0u) { keep_inv(row, inv); }
    for (var c = lid; c < p.dim; c += 64u) {
        store_scaled(row, c, x_at(row, c) * inv);
    }
}
