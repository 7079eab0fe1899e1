// The gated MLPs' activations, shared by silu_mul.wgsl, gelu_mul.wgsl and the products that
// fuse them into loading their input (the one-row ones, common/matvec.wgsl and
// common/simd8_one_row.wgsl, and down_proj's LoRA A gradient, common/matmul_dw.wgsl and
// matmul_backward_w_simd8.wgsl), so that every path computes the same values.

// SwiGLU's: silu(g) = g / (1 + exp(-g)).
fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// GeGLU's, with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`):
// gelu(g) = g / 2 * (1 + tanh(c * (g + 0.044715 g^3))), c = sqrt(2 / pi). tanh's argument is
// clamped to [-15, 15], where tanh is already +-1 in f32, so that no implementation's tanh
// overflows for large gates.
fn gelu_tanh(g: f32) -> f32 {
    let th = tanh(clamp(0.7978845608028654 * (g + 0.044715 * g * g * g), -15.0, 15.0));
    return 0.5 * g * (1.0 + th);
}

// The gated value act(g) * u: GeGLU's where `gelu`, else SwiGLU's.
fn gated(gelu: bool, g: f32, u: f32) -> f32 {
    if (gelu) { return gelu_tanh(g) * u; }
    return silu(g) * u;
}

// `gated` of four values.
fn gated4(gelu: bool, g: vec4<f32>, u: vec4<f32>) -> vec4<f32> {
    if (gelu) { return vec4<f32>(gelu_tanh(g.x), gelu_tanh(g.y), gelu_tanh(g.z), gelu_tanh(g.w)) * u; }
    return vec4<f32>(silu(g.x), silu(g.y), silu(g.z), silu(g.w)) * u;
}
