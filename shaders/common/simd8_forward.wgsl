// The forward pass y = x W^T of a linear layer over many rows, register-tiled for CPU
// rasterizers (see common/simd8.wgsl). The including shader declares `p` (MatmulParams),
// `x: array<vec4<f32>>` (M, K), `bias`, `y` and `load_w8(n, j)`, which returns weight elements
// (n, 8j..8j+7) in its storage format. K must be a multiple of 8, and x's row stride and first
// column (p.x_stride, p.x_col_offset) multiples of 4. It binds after y what the one-row
// variants bind (`const AUX_BINDING`, `LORA_H_BINDING`, `LORA_B_BINDING`), aux unused.
//
// With p.lora_rank > 0 a LoRA adapter's B product is added to the sums before the store, as
// common/matmul_forward.wgsl does for the tiled cores: y = alpha * (x W^T + lora_scale * h B^T)
// (+ bias) (+ y), h's row m at m * lora_h_stride + lora_h, B (n, rank) from element lora_b. In a
// pipeline made with ROWS_LORA each row adds its own adapter's (common/lora_table.wgsl).
//
// The `.one_row` variants (decoding, M = 1) include common/simd8_one_row.wgsl in its place.
#include "common/simd8.wgsl"
#include "common/lora_table.wgsl"

@group(0) @binding(AUX_BINDING) var<storage, read> aux: array<u32>;            // the rows' adapters (ROWS_LORA), or a dummy
@group(0) @binding(LORA_H_BINDING) var<storage, read> lora_h: array<f32>;      // h, or a dummy
@group(0) @binding(LORA_B_BINDING) var<storage, read> lora_b: array<f32>;      // B at lora_b, or a dummy

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
    // Each row its own adapter: every lane adds its four columns of each row's B product.
    if (ROWS_LORA) {
        // A loop over the rows, its body compiled once, then an add to each row's sums.
        var delta: array<vec4<f32>, 32>;
        let cols = vec4<u32>(n0, n1, n2, n3);
        for (var r = 0u; r < min(32u, p.m - r0); r++) {
            delta[r] = lora_rows_delta(r0 + r, cols);
        }
#for r in 0..32
        acc{r} += delta[{r}];
#end
    }
    // The B product: lane l loads h's value of rows r0 + 8q + l, and every lane its four
    // columns of B, one rank index at a time.
#for q in 0..4
    let hrow{q} = min(r0 + {q * 8}u + lane, p.m - 1u) * p.lora_h_stride + p.lora_h;
#end
    let shared_rank = select(p.lora_rank, 0u, ROWS_LORA);
    for (var i = 0u; i < shared_rank; i++) {
        let b = p.lora_scale * vec4<f32>(
#for c in 0..4
            lora_b[p.lora_b + n{c} * p.lora_rank + i],
#end
        );
#for q in 0..4
        let h{q} = lora_h[hrow{q} + i];
#end
#for r in 0..32
        acc{r} += subgroupBroadcast(h{r / 8}, {r % 8}u) * b;
#end
    }
#for r in 0..32
    store4(r0 + {r}u, c0, acc{r}, p.m, p.n);
#end
}
