// The forward pass y = x W^T of a linear layer over many rows, register-tiled for CPU
// rasterizers (see common/simd8.wgsl). The including shader declares `p` (MatmulParams),
// `x: array<vec4<f32>>` (M, K), `bias`, `y` and `load_w8(n, j)`, which returns weight elements
// (n, 8j..8j+7) in its storage format. K must be a multiple of 8, and x's row stride and first
// column (p.x_stride, p.x_col_offset) multiples of 4.
//
// The `.one_row` variants (decoding, M = 1) include common/simd8_one_row.wgsl in its place.
#include "common/simd8.wgsl"

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let r0 = wg.y * 32u;
    let c0 = wg.x * 32u + lane * 4u;
#for q in 0..4
    let xrow{q} = (min(r0 + {q * 8}u + lane, p.m - 1u) * p.x_stride + p.x_col_offset) / 4u;
#end
#for c in 0..4
    let n{c} = min(c0 + {c}u, p.n - 1u);
#end
#for r in 0..32
    var acc{r} = vec4<f32>();
#end
    for (var j = 0u; j < p.k / 8u; j++) {
        let b0 = load_w8(n0, j);
        let b1 = load_w8(n1, j);
        let b2 = load_w8(n2, j);
        let b3 = load_w8(n3, j);
        {
#for q in 0..4
            let a{q} = x[xrow{q} + 2u * j];
#end
#for r in 0..32
            acc{r} += dot4(subgroupBroadcast(a{r / 8}, {r % 8}u), b0.lo, b1.lo, b2.lo, b3.lo);
#end
        }
        {
#for q in 0..4
            let a{q} = x[xrow{q} + 2u * j + 1u];
#end
#for r in 0..32
            acc{r} += dot4(subgroupBroadcast(a{r / 8}, {r % 8}u), b0.hi, b1.hi, b2.hi, b3.hi);
#end
        }
    }
#for r in 0..32
    store4(r0 + {r}u, c0, acc{r}, p.m, p.n);
#end
}
