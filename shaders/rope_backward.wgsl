// Backward of RoPE, in place on the query and key gradients dq (T, n_heads * hd) and dk (T,
// n_kv_heads * hd) in one dispatch, laid out as in rope.wgsl: the rotation is orthogonal, so
// its gradient is the inverse rotation (angle negated); values past rot_dim pass. Positions as
// in rope.wgsl.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> dq: array<f32>;     // (T, n_heads * hd)
@group(0) @binding(2) var<storage, read_write> dk: array<f32>;     // (T, n_kv_heads * hd)
@group(0) @binding(3) var<storage, read> cos_sin: array<vec2<f32>>; // (max_pos, rd / 2)
@group(0) @binding(4) var<storage, read> positions: array<u32>;    // (T)

// The gradient pair (g1, g2) rotated back by the angle whose (cos, sin) is cs.
fn unrotated(g1: f32, g2: f32, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(g1 * cs.x + g2 * cs.y, g2 * cs.x - g1 * cs.y);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.rot_dim / 2u;
    let i = gid.x;                          // frequency index
    let t = gid.z;                          // token (z: more than 65535 token-heads fit)
    let head = gid.y;                       // a query head, then a key head
    if (i >= half || head >= p.n_heads + p.n_kv_heads || t >= p.n_tokens) { return; }
    let cs = cos_sin[(p.pos_offset + positions[t]) * half + i];
    if (head < p.n_heads) {
        let base = (t * p.n_heads + head) * p.head_dim;
        let r = unrotated(dq[base + i], dq[base + i + half], cs);
        dq[base + i] = r.x;
        dq[base + i + half] = r.y;
    } else {
        let base = (t * p.n_kv_heads + head - p.n_heads) * p.head_dim;
        let r = unrotated(dk[base + i], dk[base + i + half], cs);
        dk[base + i] = r.x;
        dk[base + i + half] = r.y;
    }
}
