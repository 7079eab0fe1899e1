//! AdamW over the flat LoRA buffers: gradients, first and second moments each live in one
//! buffer matching the parameters, so zeroing, the global gradient norm, clipping and the update
//! are a handful of dispatches whatever the number of adapted layers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::Encoder;
use crate::gpu::GpuContext;
use crate::gpu::launch::{self, AdamwStep};

/// AdamW hyper-parameters (torch.optim.AdamW's names and defaults, except weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamwConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
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

/// The optimizer's GPU state for `n` parameters.
#[derive(Debug)]
pub struct Optimizer {
    pub config: AdamwConfig,
    pub n: usize,
    pub grads: wgpu::Buffer,
    pub m: wgpu::Buffer,
    pub v: wgpu::Buffer,
    partials: wgpu::Buffer,
    /// The global gradient norm of the last recorded step (before clipping).
    pub norm: wgpu::Buffer,
    /// Updates applied so far (AdamW's t, for the bias corrections).
    pub steps_applied: u32,
}

impl Optimizer {
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
            steps_applied: 0,
        })
    }

    /// Records zeroing of the gradients (before accumulating a new step).
    pub fn zero_grad(&self, enc: &mut Encoder) {
        enc.clear_buffer(&self.grads, 0, None);
    }

    /// Records the gradient norm and one AdamW update of `params` at learning rate `lr`, as
    /// update number `steps_applied + 1`. The GPU skips the update when the norm is not finite;
    /// call [`Optimizer::commit`] with the norm read back to advance the step count.
    pub fn record_step(&self, ctx: &GpuContext, enc: &mut Encoder, params: &wgpu::Buffer, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("learning rate", format!("{lr} (expected a finite number >= 0)")));
        }
        let c = &self.config;
        launch::grad_norm(ctx, enc, &self.grads, &self.partials, &self.norm, self.n)?;
        let s = AdamwStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.steps_applied + 1,
            grad_scale: 1.0,
            max_grad_norm: c.max_grad_norm,
        };
        launch::adamw_step(ctx, enc, params, &self.grads, &self.m, &self.v, &self.norm, self.n, s)
    }

    /// Advances the step count if the recorded update was applied (its norm was finite).
    /// Returns whether it was.
    pub fn commit(&mut self, norm: f32) -> bool {
        let applied = norm.is_finite();
        if applied {
            self.steps_applied += 1;
        }
        applied
    }
}
