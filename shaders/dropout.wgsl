// Inverted dropout in place, with a counter-based mask: element i is kept when
// hash(i ^ mix(seed)) >= threshold (threshold = p * 2^32) and then scaled by 1 / (1 - p), else
// zeroed. The mask is a pure function of (seed, i), so the backward pass (the same operation on
// the gradient) and a recomputed forward under gradient checkpointing see the same mask without
// storing it. Applying it is also its own backward: d(x * m * s) / dx = m * s.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: DropoutParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (N)

// Chris Wellons' lowbias32 integer hash.
fn lowbias32(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    let keep = lowbias32(i ^ lowbias32(p.seed)) >= p.threshold;
    x[i] = select(0.0, x[i] * p.scale, keep);
}
