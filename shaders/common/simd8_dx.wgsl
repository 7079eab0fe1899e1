// The input gradient dx = dy W of a linear layer over many rows, register-tiled for CPU
// rasterizers (see common/simd8.wgsl): output columns are k, the reduction runs over n. The
// including shader declares `p` (MatmulParams), `dy: array<vec4<f32>>` (M, dy_stride), `bias`,
// `y` and `load_w4(n, k)`, which returns weight elements (n, k..k+3) in its storage format.
// N, K, dy_stride and dy_col_offset must be multiples of 4.
#include "common/simd8.wgsl"

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let r0 = wg.y * 32u;
    let c0 = wg.x * 32u + lane * 4u;
    let kc = min(c0, p.k - 4u);
    let s4 = p.dy_stride / 4u;
    let o4 = p.dy_col_offset / 4u;
#for q in 0..4
    let dyrow{q} = min(r0 + {q * 8}u + lane, p.m - 1u) * s4 + o4;
#end
#for r in 0..32
    var acc{r} = vec4<f32>();
#end
    for (var j = 0u; j < p.n / 4u; j++) {
        // Columns of `w` are weight rows 4j..4j+3, so w * d = sum_i d[i] * W(4j + i, kc..kc+3).
        let w = mat4x4<f32>(load_w4(4u * j, kc), load_w4(4u * j + 1u, kc), load_w4(4u * j + 2u, kc), load_w4(4u * j + 3u, kc));
#for q in 0..4
        let d{q} = dy[dyrow{q} + j];
#end
#for r in 0..32
        acc{r} += w * subgroupBroadcast(d{r / 8}, {r % 8}u);
#end
    }
#for r in 0..32
    store4(r0 + {r}u, c0, acc{r}, p.m, p.k);
#end
}
