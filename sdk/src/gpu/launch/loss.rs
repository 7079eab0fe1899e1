//! Softmax cross-entropy, forward and fused backward, and the DPO preference loss.

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
    /// The soft cap [`super::logit_softcap`] applied to these logits (Gemma 2), if any: the
    /// backward multiplies each gradient by its derivative. The forward reads them as they are.
    pub softcap: Option<f32>,
}

fn backward_params(c: CrossEntropy<'_>, grad_scale: f32, row_offset: usize) -> Result<CrossEntropyParams> {
    Ok(CrossEntropyParams {
        n_rows: u32_of(c.n_rows, "rows")?,
        vocab: u32_of(c.vocab, "vocab")?,
        grad_scale,
        row_offset: u32_of(row_offset, "row offset")?,
        softcap: c.softcap.unwrap_or(0.0),
        ..Default::default()
    })
}

/// `loss[t] = logsumexp(logits[t]) - logits[t, target[t]]`; target `u32::MAX` scores 0.
pub fn cross_entropy_forward(ctx: &GpuContext, enc: &mut Encoder, c: CrossEntropy<'_>) -> Result<()> {
    let CrossEntropy { logits, targets, loss, n_rows, vocab, .. } = c;
    let p =
        CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, ..Default::default() };
    ctx.dispatch(enc, &CROSS_ENTROPY, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}

/// Fused softmax cross-entropy forward and backward: writes `loss[t]` and replaces the logits
/// in place with grad_scale * (softmax - onehot); rows with target u32::MAX get zeros.
pub fn cross_entropy_backward(ctx: &GpuContext, enc: &mut Encoder, c: CrossEntropy<'_>, grad_scale: f32) -> Result<()> {
    let CrossEntropy { logits, targets, loss, .. } = c;
    let p = backward_params(c, grad_scale, 0)?;
    ctx.dispatch(enc, &CROSS_ENTROPY_BACKWARD, &p, &[logits, targets, loss], groups_1d(p.n_rows))
}

/// [`cross_entropy_backward`] with a weight per row: row t's gradient is also multiplied by
/// `weights[row_offset + t]` (the loss's derivative by that row's cross-entropy; DPO's come from
/// [`dpo_loss`]).
pub fn cross_entropy_backward_weighted(
    ctx: &GpuContext,
    enc: &mut Encoder,
    c: CrossEntropy<'_>,
    grad_scale: f32,
    weights: &wgpu::Buffer,
    row_offset: usize,
) -> Result<()> {
    let CrossEntropy { logits, targets, loss, .. } = c;
    let p = backward_params(c, grad_scale, row_offset)?;
    ctx.dispatch(enc, &CROSS_ENTROPY_BACKWARD_WEIGHTED, &p, &[logits, targets, loss, weights], groups_1d(p.n_rows))
}

/// u32 words per pair in [`DpoPairs::spans`]: the chosen completion's rows `[w0, w1)`, the
/// rejected one's `[w2, w3)`, and the scored tokens of each (w4, w5).
pub const DPO_SPAN: usize = 6;

/// f32 words per pair in [`dpo_loss`]'s statistics: the loss, the chosen and rejected rewards
/// (beta times the log-ratio to the reference) and the chosen and rejected log-probabilities.
pub const DPO_STATS: usize = 5;

/// The pairs of a packed batch and the per-row cross-entropies their log-probabilities sum.
#[derive(Debug, Clone, Copy)]
pub struct DpoPairs<'a> {
    /// (T) cross-entropy per row (0 where a row scores nothing).
    pub loss: &'a wgpu::Buffer,
    /// ([`DPO_SPAN`] x pairs) u32: where each pair's sequences sit.
    pub spans: &'a wgpu::Buffer,
    /// Pairs.
    pub n_pairs: usize,
}

/// A DPO loss as `dpo.wgsl` computes it (see its header): the sigmoid family
/// `a * -log sigmoid(z) + b * -log sigmoid(-z)` with `z = beta h`, or IPO's square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoLoss {
    /// The strength of the reference (IPO's tau).
    pub beta: f32,
    /// Coefficient of `-log sigmoid(z)`.
    pub a: f32,
    /// Coefficient of `-log sigmoid(-z)`.
    pub b: f32,
    /// IPO's `(h - 1 / (2 beta))^2` instead of the sigmoid family.
    pub ipo: bool,
    /// Divide each log-ratio by its completion's scored tokens (IPO).
    pub length_normalized: bool,
}

fn dpo_params(n_pairs: usize, loss: Option<DpoLoss>, grad_scale: f32) -> Result<DpoParams> {
    let l = loss.unwrap_or(DpoLoss { beta: 0.0, a: 0.0, b: 0.0, ipo: false, length_normalized: false });
    Ok(DpoParams {
        n_pairs: u32_of(n_pairs, "pairs")?,
        length_normalized: u32::from(l.length_normalized),
        ipo: u32::from(l.ipo),
        _pad: 0,
        beta: l.beta,
        a: l.a,
        b: l.b,
        grad_scale,
    })
}

/// Each pair's completion log-probabilities, (chosen, rejected) per pair, into `logps`.
pub fn dpo_logps(ctx: &GpuContext, enc: &mut Encoder, pairs: DpoPairs<'_>, logps: &wgpu::Buffer) -> Result<()> {
    let p = dpo_params(pairs.n_pairs, None, 0.0)?;
    ctx.dispatch(enc, &DPO_LOGPS, &p, &[pairs.loss, pairs.spans, logps], groups_1d(p.n_pairs))
}

/// Where [`dpo_loss`] reads the reference and writes its results.
#[derive(Debug, Clone, Copy)]
pub struct DpoOut<'a> {
    /// (2 x pairs) the reference's log-probabilities, (chosen, rejected) per pair.
    pub reference: &'a wgpu::Buffer,
    /// (T) out: `grad_scale` times the loss's derivative by each row's cross-entropy.
    pub weights: &'a wgpu::Buffer,
    /// ([`DPO_STATS`] x pairs) out.
    pub stats: &'a wgpu::Buffer,
}

/// Each pair's DPO loss, rewards and log-probabilities, and the per-row weights of the
/// cross-entropy backward that give the gradient of `grad_scale` times the summed loss.
pub fn dpo_loss(
    ctx: &GpuContext,
    enc: &mut Encoder,
    pairs: DpoPairs<'_>,
    loss: DpoLoss,
    out: DpoOut<'_>,
    grad_scale: f32,
) -> Result<()> {
    let p = dpo_params(pairs.n_pairs, Some(loss), grad_scale)?;
    ctx.dispatch(enc, &DPO, &p, &[pairs.loss, pairs.spans, out.reference, out.weights, out.stats], groups_1d(p.n_pairs))
}
