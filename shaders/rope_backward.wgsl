// Backward of RoPE, in place on dx (T, n_heads * hd): the rotation is orthogonal, so its
// gradient is the inverse rotation (angle negated); values past rot_dim pass. Positions as in
// rope.wgsl.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;     // (T, H * hd)
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>; // (max_pos, rd / 2)
@group(0) @binding(3) var<storage, read> positions: array<u32>;    // (T)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.rot_dim / 2u;
    let i = gid.x;                          // frequency index
    let t = gid.z;                          // token (z: more than 65535 token-heads fit)
    let th = t * p.n_heads + gid.y;         // token * n_heads + head
    if (i >= half || gid.y >= p.n_heads || t >= p.n_tokens) { return; }
    let cs = cos_sin[(p.pos_offset + positions[t]) * half + i];
    let base = th * p.head_dim;
    let g1 = dx[base + i];
    let g2 = dx[base + i + half];
    dx[base + i] = g1 * cs.x + g2 * cs.y;
    dx[base + i + half] = g2 * cs.x - g1 * cs.y;
}
