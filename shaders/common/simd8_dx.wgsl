// The input gradient dx = dy W of a linear layer over many rows, register-tiled for CPU
// rasterizers (see common/simd8.wgsl): output columns are k, the reduction runs over n. The
// including shader declares `p` (MatmulParams), `dy: array<vec4<f32>>` (M, dy_stride), `bias`,
// `y` and `load_w4(n, k)`, which returns weight elements (n, k..k+3) in its storage format.
// N, K, dy_stride and dy_col_offset must be multiples of 4. The bindings after y are
// LORA_H_BINDING and LORA_B_BINDING: with p.lora_rank > 0 a LoRA adapter's dh A is added to the
// sums before the store, as common/matmul_dx.wgsl does for the tiled cores.
#include "common/simd8.wgsl"
#include "common/lora_dx.wgsl"

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
    // dh A: lane l loads dh's value of rows r0 + 8q + l, and every lane its four columns of
    // A's row i, one row at a time.
#for q in 0..4
    let hrow{q} = min(r0 + {q * 8}u + lane, p.m - 1u) * p.lora_h_stride + p.lora_h;
#end
    for (var i = 0u; i < p.lora_rank; i++) {
        let at = lora_a_row(i) + kc;
        let a = p.lora_scale * vec4<f32>(lora_b[at], lora_b[at + 1u], lora_b[at + 2u], lora_b[at + 3u]);
#for q in 0..4
        let h{q} = lora_h[hrow{q} + i];
#end
#for r in 0..32
        acc{r} += subgroupBroadcast(h{r / 8}, {r % 8}u) * a;
#end
    }
#for r in 0..32
    store4(r0 + {r}u, c0, acc{r}, p.m, p.k);
#end
}
