// Rotary position embedding in the Hugging Face layout (rotate_half: pairs (i, i + rd/2) over
// the first rd = rot_dim values of each head, the rest passed through: partial RoPE when rd <
// hd), in place on x (T, n_heads * hd). Token t sits at position pos_offset + positions[t]: decoding
// passes 0, 1, 2.. with the cache length as offset; packed training batches restart the
// positions at every sample. cos/sin come from a table computed on the host in f64, so every
// adapter gets the same angles: cos_sin[pos, i] = (cos, sin) of pos * inv_freq[i].
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (T, H * hd)
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
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    x[base + i] = x1 * cs.x - x2 * cs.y;
    x[base + i + half] = x2 * cs.x + x1 * cs.y;
}
