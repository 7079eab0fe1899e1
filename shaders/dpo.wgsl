// The DPO loss of each pair of a packed batch and its derivative by every row's cross-entropy,
// from the policy's per-row cross-entropies and the reference's log-probabilities (TRL's
// DPOTrainer, `loss_type` sigmoid, robust or ipo):
//   pi_c, pi_r = the completions' log-probabilities (sums over their scored tokens)
//   h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r   (n = 1 unless length_normalized)
//   sigmoid family: z = beta h, L = a * -log sigmoid(z) + b * -log sigmoid(-z)
//     (sigmoid: a = 1, b = 0; conservative DPO, sigmoid with label smoothing e: a = 1-e, b = e;
//     robust with label smoothing e: a = (1-e)/(1-2e), b = -e/(1-2e))
//   ipo: L = (h - 1 / (2 beta))^2
// weights[row] = grad_scale * dL/dCE[row]: -dL/dh / n_c on the chosen rows, +dL/dh / n_r on the
// rejected ones (pi = -sum CE), for cross_entropy_backward.wgsl's weighted variant.
// stats per pair: loss, chosen reward beta (pi_c - ref_c), rejected reward, pi_c, pi_r.
// One workgroup per pair.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: DpoParams;
@group(0) @binding(1) var<storage, read> loss: array<f32>;          // (T) policy cross-entropy per row
@group(0) @binding(2) var<storage, read> spans: array<u32>;         // (6 P) see common/dpo_sums.wgsl
@group(0) @binding(3) var<storage, read> reference: array<f32>;     // (2 P) reference log-probabilities
@group(0) @binding(4) var<storage, read_write> weights: array<f32>; // (T) out
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;   // (5 P) out

var<workgroup> red_c: array<f32, 64>;
var<workgroup> red_r: array<f32, 64>;
var<workgroup> coef: vec2<f32>;

#include "common/dpo_sums.wgsl"

// log(sigmoid(x)), without overflow for large |x|.
fn log_sigmoid(x: f32) -> f32 {
    return min(x, 0.0) - log(1.0 + exp(-abs(x)));
}

fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) { return 1.0 / (1.0 + exp(-x)); }
    let e = exp(x);
    return e / (1.0 + e);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pair = wg.x + wg.y * 65535u;
    if (pair >= p.n_pairs) { return; }
    let pi = pair_logps(pair, lid);
    let s = pair * SPAN;
    if (lid == 0u) {
        let ratio_c = pi.x - reference[2u * pair];
        let ratio_r = pi.y - reference[2u * pair + 1u];
        var n_c = 1.0;
        var n_r = 1.0;
        if (p.length_normalized == 1u) {
            n_c = max(f32(spans[s + 4u]), 1.0);
            n_r = max(f32(spans[s + 5u]), 1.0);
        }
        let h = ratio_c / n_c - ratio_r / n_r;
        var l = 0.0;
        var dh = 0.0;
        if (p.ipo == 1u) {
            let d = h - 1.0 / (2.0 * p.beta);
            l = d * d;
            dh = 2.0 * d;
        } else {
            let z = p.beta * h;
            l = -p.a * log_sigmoid(z) - p.b * log_sigmoid(-z);
            dh = p.beta * (-p.a * sigmoid(-z) + p.b * sigmoid(z));
        }
        let o = pair * 5u;
        stats[o] = l;
        stats[o + 1u] = p.beta * ratio_c;
        stats[o + 2u] = p.beta * ratio_r;
        stats[o + 3u] = pi.x;
        stats[o + 4u] = pi.y;
        coef = vec2<f32>(-dh / n_c, dh / n_r) * p.grad_scale;
    }
    workgroupBarrier();
    let w = coef;
    for (var t = spans[s] + lid; t < spans[s + 1u]; t += 64u) { weights[t] = w.x; }
    for (var t = spans[s + 2u] + lid; t < spans[s + 3u]; t += 64u) { weights[t] = w.y; }
}
