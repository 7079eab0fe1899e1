// The forward pass y = x W^T of a linear layer over many rows, register-tiled for CPU
// rasterizers (see common/simd8.wgsl). The including shader declares `p` (MatmulParams),
// `x: array<vec4<f32>>` (M, K), `bias`, `y` and `load_w8(n, j)`, which returns weight elements
// (n, 8j..8j+7) in its storage format. K must be a multiple of 8.
//
// The ONE_ROW variant serves decoding (M = 1): each lane owns 4 of the workgroup's 32 columns,
// the lanes load successive 8-element chunks of x and broadcast them, and every weight element
// is loaded once.
#include "common/simd8.wgsl"

const ONE_ROW: u32 = 0u;

// Eight consecutive elements of a weight row.
struct Eight {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    if (ONE_ROW == 1u) {
        one_row(wg, lane);
        return;
    }
    let r0 = wg.y * 32u;
    let c0 = wg.x * 32u + lane * 4u;
    let k4 = p.k / 4u;
#for q in 0..4
    let xrow{q} = min(r0 + {q * 8}u + lane, p.m - 1u) * k4;
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

fn one_row(wg: vec3<u32>, lane: u32) {
    let c0 = wg.x * 32u + lane * 4u;
#for c in 0..4
    let n{c} = min(c0 + {c}u, p.n - 1u);
#end
    let k8 = p.k / 8u;
    var acc = vec4<f32>();
    for (var j0 = 0u; j0 < k8; j0 += 8u) {
        let own = min(j0 + lane, k8 - 1u);
        let xl = x[2u * own];
        let xh = x[2u * own + 1u];
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
    store4(0u, c0, acc, 1u, p.n);
}
