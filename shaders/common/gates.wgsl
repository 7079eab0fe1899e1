// The gated MLPs' activations, shared by silu_mul.wgsl, gelu_mul.wgsl and the one-row products
// that fuse them into their input (common/matvec.wgsl, common/simd8_one_row.wgsl), so that
// both paths compute the same values.

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
