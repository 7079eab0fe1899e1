// Gemma 2's final logit soft-capping, in place: x <- cap · tanh(x / cap) over n values (the
// logits after lm_head, before sampling or the cross-entropy; cross_entropy_backward.wgsl
// applies its derivative, 1 - (x / cap)^2 of the capped x). tanh's argument is clamped to ±15,
// where tanh is 1 in f32 already, so no backend's tanh meets an overflow.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: SoftcapParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (N)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    x[i] = p.cap * tanh(clamp(x[i] / p.cap, -15.0, 15.0));
}
