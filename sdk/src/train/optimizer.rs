//! AdamW over the flat LoRA buffers: gradients, first and second moments each live in one
//! buffer matching the parameters, so zeroing, the global gradient norm, clipping and the update
//! are a handful of dispatches whatever the number of adapted layers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::Encoder;
use crate::gpu::GpuContext;
use crate::gpu::launch::{self, AdamwBuffers, AdamwStep};

/// AdamW hyper-parameters (torch.optim.AdamW's names and defaults, except weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamwConfig {
    /// Decay of the first moment (torch's `betas[0]`).
    pub beta1: f32,
    /// Decay of the second moment (torch's `betas[1]`).
    pub beta2: f32,
    /// Added to the second moment's square root.
    pub eps: f32,
    /// Decoupled weight decay, applied as `p -= lr * weight_decay * p`.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this before each update (0 disables clipping).
    pub max_grad_norm: f32,
}

impl Default for AdamwConfig {
    fn default() -> Self {
        AdamwConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0 }
    }
}

impl AdamwConfig {
    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                p.push(format!("{name} must be in [0, 1) (got {v})"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            p.push(format!("eps must be positive (got {})", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            p.push(format!("weight_decay must be >= 0 (got {})", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            p.push(format!("max_grad_norm must be >= 0 (got {})", self.max_grad_norm));
        }
        p
    }
}

/// The optimizer's GPU state for `n` parameters. The count of updates applied lives on the GPU
/// too (AdamW's t), so that a step can be recorded while the last one is still running.
#[derive(Debug)]
pub struct Optimizer {
    /// Its hyper-parameters.
    pub config: AdamwConfig,
    /// Parameters it updates.
    pub n: usize,
    /// (n) f32: the gradients that backward passes accumulate into.
    pub grads: wgpu::Buffer,
    /// (n) f32: first moments.
    pub m: wgpu::Buffer,
    /// (n) f32: second moments.
    pub v: wgpu::Buffer,
    partials: wgpu::Buffer,
    /// The global gradient norm of the last recorded step (before clipping).
    pub norm: wgpu::Buffer,
    /// (1) u32: updates applied so far.
    pub applied: wgpu::Buffer,
    /// (1) u32: set when a loss of the step being recorded was not finite (see
    /// [`Optimizer::check_losses`]); the update is then skipped.
    pub skip: wgpu::Buffer,
    /// Bias corrections of updates 1..=bias_steps.
    bias: wgpu::Buffer,
    bias_steps: usize,
    /// The most the count can be: where it was last set, plus the steps recorded since.
    most_applied: u32,
}

/// Updates the first bias-correction table covers; it doubles when a run goes past.
const BIAS_STEPS: usize = 1024;

impl Optimizer {
    /// Zeroed state for `n` parameters; bad hyper-parameters are an error naming them.
    pub fn new(ctx: &GpuContext, n: usize, config: AdamwConfig) -> Result<Self> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::invalid("optimizer", problems.join("; ")));
        }
        Ok(Optimizer {
            config,
            n,
            grads: ctx.storage_zeroed("lora grads", n),
            m: ctx.storage_zeroed("adamw m", n),
            v: ctx.storage_zeroed("adamw v", n),
            partials: ctx.storage_zeroed("grad norm partials", launch::grad_norm_groups(n)),
            norm: ctx.storage_zeroed("grad norm", 1),
            applied: ctx.storage_zeroed("adamw updates", 1),
            skip: ctx.storage_zeroed("adamw skip", 1),
            bias: ctx.storage_from(
                "adamw bias corrections",
                &launch::adamw_bias_table(config.beta1, config.beta2, BIAS_STEPS),
            ),
            bias_steps: BIAS_STEPS,
            most_applied: 0,
        })
    }

    /// Records zeroing of the gradients and of the skip flag (before accumulating a new step).
    pub fn zero_grad(&self, enc: &mut Encoder) {
        enc.clear_buffer(&self.grads, 0, None);
        enc.clear_buffer(&self.skip, 0, None);
    }

    /// Records a check of `n` per-token losses of the step: any that is not finite makes the
    /// step's update be skipped, as a non-finite gradient norm does.
    pub fn check_losses(&self, ctx: &GpuContext, enc: &mut Encoder, losses: &wgpu::Buffer, n: usize) -> Result<()> {
        launch::flag_non_finite(ctx, enc, losses, &self.skip, n)
    }

    /// Records the gradient norm and one AdamW update of `params` at learning rate `lr`, as
    /// update number (updates applied so far) + 1, counted on the GPU. The GPU skips the update,
    /// and leaves the count, when the norm is not finite or [`Optimizer::skip`] is set; read
    /// [`Optimizer::norm`], [`Optimizer::skip`] and [`Optimizer::applied`] back to learn of it.
    pub fn record_step(&mut self, ctx: &GpuContext, enc: &mut Encoder, params: &wgpu::Buffer, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("learning rate", format!("{lr} (expected a finite number >= 0)")));
        }
        let c = self.config;
        let most = (self.most_applied + 1) as usize;
        if most > self.bias_steps {
            self.bias_steps = most.next_power_of_two();
            self.bias = ctx
                .storage_from("adamw bias corrections", &launch::adamw_bias_table(c.beta1, c.beta2, self.bias_steps));
        }
        launch::grad_norm(ctx, enc, &self.grads, &self.partials, &self.norm, self.n)?;
        let s = AdamwStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            grad_scale: 1.0,
            max_grad_norm: c.max_grad_norm,
        };
        let b = AdamwBuffers {
            param: params,
            grad: &self.grads,
            m: &self.m,
            v: &self.v,
            norm: &self.norm,
            applied: &self.applied,
            bias: &self.bias,
            skip: &self.skip,
        };
        launch::adamw_step(ctx, enc, b, self.n, s)?;
        self.most_applied += 1;
        Ok(())
    }

    /// Sets the count of updates applied (when resuming from a checkpoint).
    pub fn set_steps_applied(&mut self, ctx: &GpuContext, updates: u32) {
        ctx.queue.write_buffer(&self.applied, 0, &updates.to_le_bytes());
        self.most_applied = updates;
    }
}
