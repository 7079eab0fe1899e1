// Each pair's completion log-probabilities (chosen, rejected) from per-row cross-entropies:
// the reference model's, computed in the training step (dpo.wgsl reads them). One workgroup
// per pair.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: DpoParams;
@group(0) @binding(1) var<storage, read> loss: array<f32>;          // (T) cross-entropy per row
@group(0) @binding(2) var<storage, read> spans: array<u32>;         // (6 P) see common/dpo_sums.wgsl
@group(0) @binding(3) var<storage, read_write> logps: array<f32>;   // (2 P) out

var<workgroup> red_c: array<f32, 64>;
var<workgroup> red_r: array<f32, 64>;

#include "common/dpo_sums.wgsl"

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pair = wg.x + wg.y * 65535u;
    if (pair >= p.n_pairs) { return; }
    let l = pair_logps(pair, lid);
    if (lid == 0u) {
        logps[2u * pair] = l.x;
        logps[2u * pair + 1u] = l.y;
    }
}
