// Softmax cross-entropy per row: loss[t] = logsumexp(logits[t, :]) - logits[t, target[t]].
// A target of 0xFFFFFFFF marks a row that is not scored (loss 0). One workgroup per row.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: CrossEntropyParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;       // (T, V)
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // (T)
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;   // (T)

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.n_rows) { return; }
    let base = row * p.vocab;
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
    if (lid == 0u) {
        let t = targets[row];
        if (t == 0xFFFFFFFFu || t >= p.vocab) {
            loss[row] = 0.0;
        } else {
            loss[row] = log(red[0]) + row_max - logits[base + t];
        }
    }
}
