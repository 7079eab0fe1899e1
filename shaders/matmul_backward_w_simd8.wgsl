// Weight gradient of a dense linear layer (the LoRA A and B matrices), register-tiled for CPU
// rasterizers (common/simd8.wgsl): dw[w_offset + n*K + k] (+)= alpha * sum_m dy[m, n] * x[m, k],
// output rows n and columns k, the reduction over the M tokens. Lane l loads dy[m, n0+4l..n0+4l+3]
// and x[m, k0+4l..k0+4l+3]; the 32 dy values are broadcast one at a time. N and K are multiples
// of 4, and so are the rows' strides and first columns (p.dy_stride, p.dy_col_offset, p.x_stride,
// p.x_col_offset: N, 0, K, 0 when contiguous). In the `.gated` variant (p.x_op X_SILU_MUL or
// X_GELU_MUL) x is the MLP's gate and aux its up projection, read as act(gate) * up
// (common/gates.wgsl). In the `.normed` variant (p.x_op X_RMS_KEPT) x is a norm's input, aux
// the norm's weight and row_scale each row's kept 1 / rms, read as aux[k] * (x * row_scale[m])
// as the norm wrote its rows. (Other adapters and shapes: matmul_backward_w.wgsl.)
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;     // (M, N)
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;      // (M, K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // unused (has_bias = 0)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // flat dw
@group(0) @binding(5) var<storage, read> aux: array<vec4<f32>>;    // as x with a gate (the up projection), (K) with a norm, or a dummy
@group(0) @binding(6) var<storage, read> row_scale: array<f32>;    // (M) each row's 1 / rms with a norm, or a dummy

#include "common/simd8.wgsl"
#include "common/gates.wgsl"

// 1 in the `.gated` variant, the one that reads x through the op: a branch on p.x_op in the
// loop would cost the other weight gradients on a CPU rasterizer.
const X_GATED: u32 = 0u;
// 1 in the `.normed` variant, the one that reads x through a norm with kept 1 / rms.
const X_NORMED: u32 = 0u;

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let r0 = wg.y * 32u;
    let c0 = wg.x * 32u + lane * 4u;
    let dy4 = p.dy_stride / 4u;
    let x4 = p.x_stride / 4u;
    let dcol = p.dy_col_offset / 4u + min(r0 / 4u + lane, p.n / 4u - 1u);
    let xcol = p.x_col_offset / 4u + min(c0, p.k - 4u) / 4u;
#for r in 0..32
    var acc{r} = vec4<f32>();
#end
    var norm_w = vec4<f32>();
    if (X_NORMED != 0u) { norm_w = aux[min(c0, p.k - 4u) / 4u]; }
    for (var m = 0u; m < p.m; m++) {
        let d = dy[m * dy4 + dcol];
        var xv = x[m * x4 + xcol];
        if (X_GATED != 0u) { xv = gated4(p.x_op == X_GELU_MUL, xv, aux[m * x4 + xcol]); }
        if (X_NORMED != 0u) { xv = norm_w * (xv * row_scale[m]); }
#for r in 0..32
        acc{r} += subgroupBroadcast(d[{r % 4}], {r / 4}u) * xv;
#end
    }
#for r in 0..32
    store4(r0 + {r}u, c0, acc{r}, p.n, p.k);
#end
}
