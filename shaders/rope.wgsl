// Rotary position embedding in the Hugging Face layout (rotate_half: pairs (i, i + rd/2) over
// the first rd = rot_dim values of each head, the rest passed through: partial RoPE when rd <
// hd), in place on the queries q (T, n_heads * hd) and the keys k (T, n_kv_heads * hd) in one
// dispatch: grid rows [0, n_heads) are q's heads, the next n_kv_heads k's. Token t sits at
// position pos_offset + positions[t]: decoding passes 0, 1, 2.. with the cache length as
// offset; packed training batches restart the positions at every sample. cos/sin come from a
// table computed on the host in f64, so every adapter gets the same angles: cos_sin[pos, i] =
// (cos, sin) of pos * inv_freq[i]. The rope_backward variant (INVERSE = 1) rotates the
// gradients back: the rotation is orthogonal, so its gradient is the inverse rotation (the
// angle negated, an exact sign flip of the sine).
#include "common/params.wgsl"

const INVERSE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;      // (T, n_heads * hd), or its gradient
@group(0) @binding(2) var<storage, read_write> k: array<f32>;      // (T, n_kv_heads * hd), or its gradient
@group(0) @binding(3) var<storage, read> cos_sin: array<vec2<f32>>; // (max_pos, rd / 2)
@group(0) @binding(4) var<storage, read> positions: array<u32>;    // (T)

// The pair (x1, x2) rotated by the angle whose (cos, sin) is cs.
fn rotated(x1: f32, x2: f32, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x1 * cs.x - x2 * cs.y, x2 * cs.x + x1 * cs.y);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.rot_dim / 2u;
    let i = gid.x;                          // frequency index
    let t = gid.z;                          // token (z: more than 65535 token-heads fit)
    let head = gid.y;                       // a query head, then a key head
    if (i >= half || head >= p.n_heads + p.n_kv_heads || t >= p.n_tokens) { return; }
    var cs = cos_sin[(p.pos_offset + positions[t]) * half + i];
    if (INVERSE == 1u) { cs.y = -cs.y; }
    if (head < p.n_heads) {
        let base = (t * p.n_heads + head) * p.head_dim;
        let r = rotated(q[base + i], q[base + i + half], cs);
        q[base + i] = r.x;
        q[base + i + half] = r.y;
    } else {
        let base = (t * p.n_kv_heads + head - p.n_heads) * p.head_dim;
        let r = rotated(k[base + i], k[base + i + half], cs);
        k[base + i] = r.x;
        k[base + i + half] = r.y;
    }
}
