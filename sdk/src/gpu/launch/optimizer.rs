//! The global gradient norm and AdamW.

use super::*;

/// AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections.
    pub step: u32,
    /// Multiplies every gradient first (loss scaling).
    pub grad_scale: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
}

/// Workgroups of the first grad-norm pass for n values (its partials buffer holds this many).
pub fn grad_norm_groups(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 256)
}

/// norm[0] = the L2 norm of x (n values), through `partials` (grad_norm_groups(n) floats).
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

/// One AdamW step over flat `param`, `grad`, `m` and `v` buffers of `n` values, clipped by
/// the global gradient norm in `norm[0]` (see [`grad_norm`]); a non-finite norm skips it.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    ctx: &GpuContext,
    enc: &mut Encoder,
    param: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    m: &wgpu::Buffer,
    v: &wgpu::Buffer,
    norm: &wgpu::Buffer,
    n: usize,
    s: AdamwStep,
) -> Result<()> {
    if s.step == 0 {
        return Err(Error::invalid("AdamW step", "steps count from 1"));
    }
    let (c1, c2) = crate::reference::adamw_bias_corrections(s.beta1, s.beta2, s.step);
    let p = AdamwParams {
        n: u32_of(n, "parameters")?,
        lr: s.lr,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        weight_decay: s.weight_decay,
        bias_c1: c1,
        bias_c2: c2,
        grad_scale: s.grad_scale,
        max_grad_norm: s.max_grad_norm,
        ..Default::default()
    };
    ctx.dispatch(enc, &ADAMW, &p, &[param, grad, m, v, norm], groups_1d(p.n.div_ceil(256)))
}
