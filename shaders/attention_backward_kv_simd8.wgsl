// Attention backward, second pass, for CPU rasterizers: the contract of
// attention_backward_kv.wgsl (key and value gradients), organised like attention_simd8.wgsl with
// the roles swapped: one subgroup of 8 lanes per 8 consecutive keys of a kv head, a key per lane
// with its k, v, dk and dv in registers; each query row (q and dout, for every query head of
// the group) is loaded once, spread over the lanes and broadcast.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: AttentionParams;
#include "common/softcap.wgsl"
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;      // (T, H * hd)
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;      // (T, Hkv * hd)
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;      // (T, Hkv * hd)
@group(0) @binding(4) var<storage, read> key_start: array<u32>;    // (T)
@group(0) @binding(5) var<storage, read> dout: array<vec4<f32>>;   // (T, H * hd)
@group(0) @binding(6) var<storage, read> stats: array<vec2<f32>>;  // (T * H): (lse, delta)
@group(0) @binding(7) var<storage, read_write> dk: array<vec4<f32>>; // (T, Hkv * hd)
@group(0) @binding(8) var<storage, read_write> dv: array<vec4<f32>>; // (T, Hkv * hd)

const HD4: u32 = 32u;   // vec4s per head the kernel is unrolled for, at most 64 (variants override it)

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let kvh = wg.y;
    let j0 = wg.x * 8u;
    let j = j0 + lane;
    let valid = j < p.n_tokens;
    let jq = min(j, p.n_tokens - 1u);
    let j_max = min(j0 + 7u, p.n_tokens - 1u);
    let hd4 = p.head_dim / 4u;
    let rep = p.n_heads / p.n_kv_heads;
    let row = jq * (p.kv_stride / 4u) + kvh * hd4;
#for i in 0..64
    var k{i} = vec4<f32>();
    var v{i} = vec4<f32>();
    var dk{i} = vec4<f32>();
    var dv{i} = vec4<f32>();
    if ({i}u < HD4 && {i}u < hd4) {
        k{i} = k[row + {i}u] * p.scale;
        v{i} = v[row + {i}u];
    }
#end
    // Queries t >= j see key j while their sample started at or before it; key_start never
    // decreases along a packed batch, so the scan ends at the first query past every key here.
    for (var t = j0; t < p.n_tokens; t++) {
        let first_key = key_start[t];
        if (first_key > j_max) { break; }
        let seen = valid && t >= j && first_key <= j;
        for (var hr = 0u; hr < rep; hr++) {
            let h = kvh * rep + hr;
            let qb = (t * p.n_heads + h) * hd4;
#for c in 0..8
            var ql{c} = vec4<f32>();
            var gl{c} = vec4<f32>();
            if ({c * 8}u < HD4 && {c * 8}u + lane < hd4) {
                ql{c} = q[qb + {c * 8}u + lane];
                gl{c} = dout[qb + {c * 8}u + lane];
            }
#end
            var s = 0.0;
            var dp = 0.0;
#for i in 0..64
            var qt{i} = vec4<f32>();
            var gt{i} = vec4<f32>();
            if ({i}u < HD4 && {i}u < hd4) {
                qt{i} = subgroupBroadcast(ql{i / 8}, {i % 8}u);
                gt{i} = subgroupBroadcast(gl{i / 8}, {i % 8}u);
                s += dot(qt{i}, k{i});
                dp += dot(gt{i}, v{i});
            }
#end
            let st = stats[t * p.n_heads + h];
            let pv = select(0.0, exp(softcap(s) - st.x), seen);
            let ds = pv * (dp - st.y) * softcap_grad(s);
#for i in 0..64
            if ({i}u < HD4 && {i}u < hd4) {
                dv{i} += pv * gt{i};
                dk{i} += ds * qt{i};
            }
#end
        }
    }
    if (valid) {
#for i in 0..64
        if ({i}u < HD4 && {i}u < hd4) {
            dk[row + {i}u] = dk{i} * p.scale;
            dv[row + {i}u] = dv{i};
        }
#end
    }
}
