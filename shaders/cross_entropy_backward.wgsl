// Fused softmax cross-entropy, forward and backward in one pass over each row, in place:
//   loss[t]       = logsumexp(logits[t, :]) - logits[t, target[t]]
//   logits[t, v] <- grad_scale * (softmax(logits[t, :])[v] - (v == target[t]))
// grad_scale is 1 / (number of scored tokens in the batch), so the gradients are those of the
// mean loss; the `.weighted` variant also multiplies row t's gradient by weights[row_offset + t]
// (common/ce_weighted.wgsl), the loss's derivative by that row's cross-entropy. A target of 0xFFFFFFFF marks a row that is not scored: loss 0, gradient 0. The
// logits are never needed again, so overwriting them saves a (T, V) buffer. One workgroup per row.
// Logits that logit_softcap.wgsl capped (p.softcap > 0) get its derivative in the gradient.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: CrossEntropyParams;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>; // (T, V) in, dlogits out
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // (T)
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;   // (T)
#include "common/ce_unweighted.wgsl"

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.n_rows) { return; }
    let base = row * p.vocab;
    let t = targets[row];
    let scored = t != 0xFFFFFFFFu && t < p.vocab;
    var m = -3.402823e38;
    for (var v = lid; v < p.vocab; v += 64u) { m = max(m, logits[base + v]); }
    red[lid] = m;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var v = lid; v < p.vocab; v += 64u) { sum += exp(logits[base + v] - row_max); }
    red[lid] = sum;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    if (lid == 0u) {
        if (scored) {
            loss[row] = log(total) + row_max - logits[base + t];
        } else {
            loss[row] = 0.0;
        }
    }
    // Every thread has read logits[base + t] (through the reductions) before any write below,
    // and the barrier orders lid 0's read above against the writes.
    workgroupBarrier();
    let inv = 1.0 / total;
    for (var v = lid; v < p.vocab; v += 64u) {
        var g = 0.0;
        if (scored) {
            g = exp(logits[base + v] - row_max) * inv;
            if (v == t) { g -= 1.0; }
            g *= p.grad_scale * row_weight(row);
            // Logits soft-capped by logit_softcap.wgsl: the chain rule through
            // cap · tanh(x / cap), whose derivative is 1 - (capped / cap)^2.
            if (p.softcap > 0.0) {
                let r = logits[base + v] / p.softcap;
                g *= 1.0 - r * r;
            }
        }
        logits[base + v] = g;
    }
}
