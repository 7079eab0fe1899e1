// The second half of the dK/dV pass split by query head (attention_backward_kv_t128.wgsl with
// p.head_split): each key's dK and dV are the sums of the shares of the rep query heads that
// read it, from the partials ((head in group) T + key, dK or dV, Hkv * hd).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
@group(0) @binding(1) var<storage, read> partial: array<f32>;      // (rep, T, 2, Hkv * hd)
@group(0) @binding(2) var<storage, read_write> dk: array<f32>;     // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read_write> dv: array<f32>;     // (T, Hkv * hd)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    let w = p.kv_stride;
    if (i >= p.n_tokens * w) { return; }
    let j = i / w;
    let c = i % w;
    var g = vec2<f32>(0.0);
    for (var r = 0u; r < p.n_heads / p.n_kv_heads; r++) {
        let at = (r * p.n_tokens + j) * 2u * w + c;
        g += vec2<f32>(partial[at], partial[at + w]);
    }
    dk[i] = g.x;
    dv[i] = g.y;
}
