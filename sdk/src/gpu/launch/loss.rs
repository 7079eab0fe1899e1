//! Softmax cross-entropy, forward and fused backward.

use super::*;

/// Softmax cross-entropy over `n_rows` rows of `vocab` logits.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy<'a> {
    /// (n_rows, vocab) logits.
    pub logits: &'a wgpu::Buffer,
    /// (n_rows) u32 targets; u32::MAX scores nothing.
    pub targets: &'a wgpu::Buffer,
    /// (n_rows) losses out.
    pub loss: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub n_rows: usize,
    /// Logits a row.
    pub vocab: usize,
}

/// `loss[t] = logsumexp(logits[t]) - logits[t, target[t]]`; target `u32::MAX` scores 0.
pub fn cross_entropy_forward(ctx: &GpuContext, enc: &mut Encoder, c: CrossEntropy<'_>) -> Result<()> {
    let CrossEntropy { logits, targets, loss, n_rows, vocab } = c;
    let p =
        CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, ..Default::default() };
    ctx.dispatch(enc, &CROSS_ENTROPY, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}

/// Fused softmax cross-entropy forward and backward: writes `loss[t]` and replaces the logits
/// in place with grad_scale * (softmax - onehot); rows with target u32::MAX get zeros.
pub fn cross_entropy_backward(ctx: &GpuContext, enc: &mut Encoder, c: CrossEntropy<'_>, grad_scale: f32) -> Result<()> {
    let CrossEntropy { logits, targets, loss, n_rows, vocab } = c;
    let p = CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, grad_scale, _pad: 0 };
    ctx.dispatch(enc, &CROSS_ENTROPY_BACKWARD, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}
