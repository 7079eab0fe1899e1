//! The global gradient norm and AdamW.

use super::*;

/// AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep {
    /// The step's learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the second moment's square root.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Multiplies every gradient first (loss scaling).
    pub grad_scale: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
}

/// Workgroups of the first grad-norm pass for n values (its partials buffer holds this many).
pub fn grad_norm_groups(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 256)
}

/// `norm[0]` = the L2 norm of x (n values), through `partials` (grad_norm_groups(n) floats).
pub fn grad_norm(
    ctx: &GpuContext,
    enc: &mut Encoder,
    x: &wgpu::Buffer,
    partials: &wgpu::Buffer,
    norm: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    let g = grad_norm_groups(n);
    let p1 = GradNormParams { n: u32_of(n, "parameters")?, final_pass: 0, n_groups: g as u32, _pad: 0 };
    ctx.dispatch(enc, &GRAD_NORM, &p1, &[x, partials], [g as u32, 1, 1])?;
    let p2 = GradNormParams { n: g as u32, final_pass: 1, n_groups: 1, _pad: 0 };
    ctx.dispatch(enc, &GRAD_NORM, &p2, &[partials, norm], [1, 1, 1])
}

/// The buffers of an AdamW step, each of `n` values unless said otherwise.
#[derive(Debug, Clone, Copy)]
pub struct AdamwBuffers<'a> {
    /// The parameters, updated in place.
    pub param: &'a wgpu::Buffer,
    /// Their gradients.
    pub grad: &'a wgpu::Buffer,
    /// First moments, updated in place.
    pub m: &'a wgpu::Buffer,
    /// Second moments, updated in place.
    pub v: &'a wgpu::Buffer,
    /// (1) the global gradient norm (see [`grad_norm`]).
    pub norm: &'a wgpu::Buffer,
    /// (1) u32: updates applied so far. This one is update `applied + 1`, and adds one to it
    /// when it is applied.
    pub applied: &'a wgpu::Buffer,
    /// The bias corrections of updates 1, 2, ... as pairs (see [`adamw_bias_table`]); updates
    /// past its end use its last pair.
    pub bias: &'a wgpu::Buffer,
    /// (1) u32: non-zero skips the update, as a non-finite norm does (see [`flag_non_finite`]).
    pub skip: &'a wgpu::Buffer,
}

/// Sets `flag[0]` to 1 if any of the n values of x is not finite; leaves it otherwise.
pub fn flag_non_finite(
    ctx: &GpuContext,
    enc: &mut Encoder,
    x: &wgpu::Buffer,
    flag: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    let p = ElementwiseParams { n: u32_of(n, "values")?, ..Default::default() };
    ctx.dispatch(enc, &FINITE_CHECK, &p, &[x, flag], [1, 1, 1])
}

/// The bias corrections `(1 - beta1^t, 1 - beta2^t)` of updates t = 1..=steps, flattened, for
/// [`AdamwBuffers::bias`].
pub fn adamw_bias_table(beta1: f32, beta2: f32, steps: usize) -> Vec<f32> {
    (1..=steps as u32)
        .flat_map(|t| {
            let (c1, c2) = crate::prim::adamw_bias_corrections(beta1, beta2, t);
            [c1, c2]
        })
        .collect()
}

/// One AdamW step over flat buffers of `n` values, clipped by the global gradient norm in
/// `norm[0]` (see [`grad_norm`]); a non-finite norm, or a set `skip` flag, skips it. The update's number comes from
/// the GPU's own count (`applied`), so a step can be recorded before the last one's norm is
/// known on the host. Two dispatches: the update, then the count.
pub fn adamw_step(ctx: &GpuContext, enc: &mut Encoder, b: AdamwBuffers<'_>, n: usize, s: AdamwStep) -> Result<()> {
    let table_len = b.bias.size() / 8;
    if table_len == 0 || b.applied.size() < 4 || b.norm.size() < 4 {
        return Err(Error::invalid(
            "AdamW step",
            "needs a norm, an update count and at least one pair of bias corrections",
        ));
    }
    let p = AdamwParams {
        n: u32_of(n, "parameters")?,
        lr: s.lr,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        weight_decay: s.weight_decay,
        grad_scale: s.grad_scale,
        max_grad_norm: s.max_grad_norm,
        table_len: u32::try_from(table_len).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let buffers = [b.param, b.grad, b.m, b.v, b.norm, b.applied, b.bias, b.skip];
    ctx.dispatch(enc, &ADAMW, &p, &buffers, groups_1d(p.n.div_ceil(256)))?;
    ctx.dispatch(enc, &ADAMW_COMMIT, &ElementwiseParams::default(), &[b.norm, b.applied, b.skip], [1, 1, 1])
}
