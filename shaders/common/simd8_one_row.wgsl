// The forward pass y = x W^T of a linear layer for one row of x (decoding), register-tiled for
// CPU rasterizers (see common/simd8.wgsl); the `.one_row` variants include it in place of
// common/simd8_forward.wgsl, whose declarations it takes, plus `const AUX_BINDING`,
// `LORA_H_BINDING` and `LORA_B_BINDING` (the bindings after y). Each lane owns 4 of the workgroup's 32 columns, the lanes load successive
// 8-element chunks of x and broadcast them, and every weight element is loaded once.
//
// p.x_op fuses the op before the product into loading x, as in common/matvec.wgsl: with
// X_RMS_NORM each chunk is multiplied by the norm's weight (aux) as it is loaded, the lanes sum
// the squares of the chunks they loaded, and rsqrt(mean(x^2) + eps) scales the sums; with
// X_SILU_MUL or X_GELU_MUL each chunk of the gate (x) is activated and multiplied by up's (aux).
// With p.lora_rank > 0 each lane adds a LoRA adapter's B product to its columns after the
// store, as common/matvec.wgsl does: y[col] += lora_scale * lora_h . B[col, :].
#include "common/simd8.wgsl"
#include "common/gates.wgsl"

@group(0) @binding(AUX_BINDING) var<storage, read> aux: array<vec4<f32>>;      // (K) or a dummy
@group(0) @binding(LORA_H_BINDING) var<storage, read> lora_h: array<f32>;      // (r) x A^T, or a dummy
@group(0) @binding(LORA_B_BINDING) var<storage, read> lora_b: array<f32>;      // B at lora_b, or a dummy

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let c0 = wg.x * 32u + lane * 4u;
#for c in 0..4
    let n{c} = min(c0 + {c}u, p.n - 1u);
#end
    let k8 = p.k / 8u;
    var acc = vec4<f32>();
    var sum_sq = 0.0;
    for (var j0 = 0u; j0 < k8; j0 += 8u) {
        let own = min(j0 + lane, k8 - 1u);
        var xl = x[2u * own];
        var xh = x[2u * own + 1u];
        if (p.x_op == X_RMS_NORM) {
            // Past the row's end a lane reloads its last chunk: counted once.
            if (j0 + lane < k8) { sum_sq += dot(xl, xl) + dot(xh, xh); }
            xl *= aux[2u * own];
            xh *= aux[2u * own + 1u];
        } else if (p.x_op != X_AS_IS) {
            xl = gated4(p.x_op == X_GELU_MUL, xl, aux[2u * own]);
            xh = gated4(p.x_op == X_GELU_MUL, xh, aux[2u * own + 1u]);
        }
#for s in 0..8
        if (j0 + {s}u < k8) {
            let j = j0 + {s}u;
            let b0 = load_w8(n0, j);
            let b1 = load_w8(n1, j);
            let b2 = load_w8(n2, j);
            let b3 = load_w8(n3, j);
            acc += dot4(subgroupBroadcast(xl, {s}u), b0.lo, b1.lo, b2.lo, b3.lo);
            acc += dot4(subgroupBroadcast(xh, {s}u), b0.hi, b1.hi, b2.hi, b3.hi);
        }
#end
    }
    if (p.x_op == X_RMS_NORM) {
        acc *= inverseSqrt(subgroupAdd(sum_sq) / f32(p.k) + p.norm_eps);
    }
    store4(0u, c0, acc, 1u, p.n);
    for (var c = c0; c < min(c0 + 4u, p.n) && p.lora_rank != 0u; c++) {
        var d = 0.0;
        for (var i = 0u; i < p.lora_rank; i++) { d += lora_h[p.lora_h + i] * lora_b[p.lora_b + c * p.lora_rank + i]; }
        y[p.y_col_offset + c] += p.lora_scale * d;
    }
}
