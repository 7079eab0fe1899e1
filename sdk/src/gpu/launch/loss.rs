//! Softmax cross-entropy, forward and fused backward.

use super::*;

/// loss[t] = logsumexp(logits[t]) - logits[t, target[t]]; target u32::MAX scores 0.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    logits: &wgpu::Buffer,
    targets: &wgpu::Buffer,
    loss: &wgpu::Buffer,
    n_rows: usize,
    vocab: usize,
) -> Result<()> {
    let p =
        CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, ..Default::default() };
    ctx.dispatch(enc, &CROSS_ENTROPY, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}

/// Fused softmax cross-entropy forward and backward: writes loss[t] and replaces the logits
/// in place with grad_scale * (softmax - onehot); rows with target u32::MAX get zeros.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    logits: &wgpu::Buffer,
    targets: &wgpu::Buffer,
    loss: &wgpu::Buffer,
    n_rows: usize,
    vocab: usize,
    grad_scale: f32,
) -> Result<()> {
    let p = CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, grad_scale, _pad: 0 };
    ctx.dispatch(enc, &CROSS_ENTROPY_BACKWARD, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}
