// The forward pass y = x W^T of a linear layer for one row of x (decoding), register-tiled for
// CPU rasterizers (see common/simd8.wgsl); the `.one_row` variants include it in place of
// common/simd8_forward.wgsl, whose declarations it takes, plus `const NORM_BINDING` (the
// binding after y). Each lane owns 4 of the workgroup's 32 columns, the lanes load successive
// 8-element chunks of x and broadcast them, and every weight element is loaded once.
//
// With p.row_norm the RMSNorm before the product is fused into it (see common/matvec.wgsl):
// x is the raw row, each chunk is multiplied by the norm's weight as it is loaded, the lanes
// sum the squares of the chunks they loaded, and rsqrt(mean(x^2) + eps) scales the sums.
#include "common/simd8.wgsl"

@group(0) @binding(NORM_BINDING) var<storage, read> norm_w: array<vec4<f32>>;  // (K) or a dummy

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let c0 = wg.x * 32u + lane * 4u;
#for c in 0..4
    let n{c} = min(c0 + {c}u, p.n - 1u);
#end
    let k8 = p.k / 8u;
    let normed = p.row_norm != 0u;
    var acc = vec4<f32>();
    var sum_sq = 0.0;
    for (var j0 = 0u; j0 < k8; j0 += 8u) {
        let own = min(j0 + lane, k8 - 1u);
        var xl = x[2u * own];
        var xh = x[2u * own + 1u];
        if (normed) {
            // Past the row's end a lane reloads its last chunk: counted once.
            if (j0 + lane < k8) { sum_sq += dot(xl, xl) + dot(xh, xh); }
            xl *= norm_w[2u * own];
            xh *= norm_w[2u * own + 1u];
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
    if (normed) {
        acc *= inverseSqrt(subgroupAdd(sum_sq) / f32(p.k) + p.norm_eps);
    }
    store4(0u, c0, acc, 1u, p.n);
}
