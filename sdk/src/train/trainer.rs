//! The training loop: epochs or a step budget over packed batches, gradient accumulation, the
//! learning-rate schedule, evaluation with early stopping, progress events, cancellation from
//! another thread, non-finite step detection and checkpoint/resume.
//!
//! Determinism: the samples are shuffled once with the configured seed and packed into batches
//! of at most `batch_tokens` tokens; every epoch visits those batches in an order drawn from an
//! RNG whose state at the start of the epoch is saved in each checkpoint. With the same seed,
//! data and adapter, two runs (or one run and a run resumed from its checkpoint) execute the
//! same kernels on the same inputs and give byte-identical adapters.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, FNV_OFFSET, TrainState, fnv1a};
use super::optimizer::{AdamwConfig, Optimizer};
use super::schedule::{Schedule, ScheduleKind};
use crate::data::{self, DataConfig, Dataset, Sample};
use crate::error::{Error, Result};
use crate::infer::Rng;
use crate::lora::{Adapter, GpuAdapter, LoraConfig};
use crate::model::llama::Model;
use crate::model::training::{Batch, Precision, Workspace, WorkspacePlan};

/// Everything that decides a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub optimizer: AdamwConfig,
    /// Peak learning rate.
    pub learning_rate: f32,
    pub lr_schedule: ScheduleKind,
    /// Steps of linear warmup from 0 to the peak.
    pub warmup_steps: u64,
    /// Passes over the training set (ignored when `max_steps` is set).
    pub epochs: u64,
    /// Optimizer steps to take; 0 lets `epochs` decide.
    pub max_steps: u64,
    /// Tokens per packed micro-batch (samples laid end to end, never attending to each other).
    pub batch_tokens: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    /// Evaluate on the validation set every this many steps; 0 evaluates at the end of each
    /// epoch.
    pub eval_every: u64,
    /// Stop after this many evaluations without a better validation loss; 0 never stops early.
    pub early_stopping_patience: u32,
    /// Return (and save) the adapter with the best validation loss rather than the last one.
    pub keep_best: bool,
    /// Keep only each layer's input and recompute the layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Storage of the activations saved for the backward pass: "f32", or "f16" (mixed
    /// precision: half the activation memory; arithmetic, LoRA weights, gradients and AdamW
    /// moments stay f32).
    pub activations: Precision,
    /// Seed of the batch order.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only when training ends or is cancelled).
    pub checkpoint_every: u64,
    /// Consecutive non-finite steps (skipped) after which training stops with an error.
    pub max_bad_steps: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora: LoraConfig::default(),
            data: DataConfig::default(),
            optimizer: AdamwConfig::default(),
            learning_rate: 2e-4,
            lr_schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            epochs: 3,
            max_steps: 0,
            batch_tokens: 1024,
            grad_accum: 1,
            eval_every: 0,
            early_stopping_patience: 0,
            keep_best: true,
            gradient_checkpointing: true,
            activations: Precision::F32,
            seed: 0,
            checkpoint_every: 0,
            max_bad_steps: 3,
        }
    }
}

impl TrainConfig {
    /// Every problem with this configuration, as one error.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if let Err(Error::Invalid { what, .. }) = self.lora.validate() {
            p.push(format!("lora: {what}"));
        }
        p.extend(self.data.problems().into_iter().map(|s| format!("data: {s}")));
        p.extend(self.optimizer.problems().into_iter().map(|s| format!("optimizer: {s}")));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            p.push(format!("learning_rate must be a finite number > 0 (got {})", self.learning_rate));
        }
        if self.epochs == 0 && self.max_steps == 0 {
            p.push("set epochs or max_steps to at least 1".into());
        }
        if self.batch_tokens < 2 {
            p.push(format!("batch_tokens must be at least 2 (got {})", self.batch_tokens));
        }
        if self.grad_accum == 0 {
            p.push("grad_accum must be at least 1".into());
        }
        if self.max_bad_steps == 0 {
            p.push("max_bad_steps must be at least 1".into());
        }
        if p.is_empty() { Ok(()) } else { Err(Error::invalid("training config", p.join("; "))) }
    }
}

/// What the trainer reports while it runs (serialized as JSON lines by the CLI's `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Started {
        total_steps: u64,
        /// The step training starts from (non-zero when resumed).
        start_step: u64,
        train_samples: usize,
        val_samples: usize,
        batches_per_epoch: usize,
        trainable_parameters: usize,
        /// Planned GPU bytes: weights, adapter with gradients and moments, and the workspace.
        planned_gpu_bytes: u64,
    },
    Step {
        step: u64,
        total_steps: u64,
        /// Fractional epochs done.
        epoch: f64,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        tokens: u64,
        tokens_per_s: f64,
        eta_s: f64,
        /// Bytes the driver reports allocated, or the planned bytes where it reports none.
        gpu_memory_bytes: u64,
    },
    Eval {
        step: u64,
        val_loss: f32,
        perplexity: f32,
        best_val_loss: f32,
        improved: bool,
    },
    Warning {
        step: u64,
        message: String,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    Finished {
        step: u64,
        reason: StopReason,
        best_val_loss: Option<f32>,
    },
}

/// Why training ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    EarlyStopped,
    Cancelled,
}

/// The result of [`Trainer::run`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub reason: StopReason,
    pub steps: u64,
    /// Mean loss of the last step.
    pub last_loss: Option<f32>,
    pub best_val_loss: Option<f32>,
    /// The trained adapter: the best one by validation loss with `keep_best`, else the last.
    pub adapter: Adapter,
}

/// A handle that stops a running [`Trainer`] from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Trains a LoRA adapter on a model.
#[derive(Debug)]
pub struct Trainer {
    model: Arc<Model>,
    cfg: TrainConfig,
    train: Vec<Batch>,
    val: Vec<Batch>,
    n_samples: (usize, usize),
    adapter: GpuAdapter,
    opt: Optimizer,
    ws: Workspace,
    state: TrainState,
    best: Option<Vec<f32>>,
    plan_fingerprint: u64,
    cancel: CancelToken,
    checkpoint: Option<PathBuf>,
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        v.swap(i, j);
    }
}

fn batches(samples: &[&Sample], capacity: usize) -> Result<Vec<Batch>> {
    data::pack(samples, capacity)
        .iter()
        .map(|group| Batch::pack(group.iter().map(|&i| (samples[i].ids.as_slice(), samples[i].train.as_slice()))))
        .collect()
}

impl Trainer {
    /// Prepares training of a fresh adapter (PEFT's initialization, seeded by `cfg.lora.seed`).
    pub fn new(model: Arc<Model>, dataset: &Dataset, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let adapter = Adapter::new(&model.config, cfg.lora.clone())?;
        Self::with_adapter(model, dataset, cfg, adapter)
    }

    /// Prepares training that starts from `adapter` (its configuration replaces `cfg.lora`).
    pub fn with_adapter(model: Arc<Model>, dataset: &Dataset, mut cfg: TrainConfig, adapter: Adapter) -> Result<Self> {
        cfg.lora = adapter.config.clone();
        cfg.validate()?;
        if dataset.train.is_empty() {
            return Err(Error::invalid("dataset", "has no training samples"));
        }
        if let Some(n) = dataset.train.iter().map(|s| s.ids.len()).filter(|&n| n > cfg.batch_tokens).max() {
            return Err(Error::invalid(
                "batch_tokens",
                format!(
                    "{} is less than the longest sample ({n} tokens); raise it or lower data.max_len",
                    cfg.batch_tokens
                ),
            ));
        }
        if let Some(s) = dataset.train.iter().chain(&dataset.val).find(|s| s.ids.len() > model.max_context) {
            return Err(Error::invalid(
                "data.max_len",
                format!(
                    "{}:{}: a sample of {} tokens exceeds the model's context of {}",
                    s.file.display(),
                    s.line,
                    s.ids.len(),
                    model.max_context
                ),
            ));
        }
        // Shuffle once so that batches mix samples, then pack: the batch count is then fixed,
        // and so is the number of steps the schedule spans.
        let mut order: Vec<&Sample> = dataset.train.iter().collect();
        shuffle(&mut order, &mut Rng::new(cfg.seed));
        let train = batches(&order, cfg.batch_tokens)?;
        let val_refs: Vec<&Sample> = dataset.val.iter().collect();
        let val = batches(&val_refs, cfg.batch_tokens)?;
        let mut plan = FNV_OFFSET;
        for b in &train {
            fnv1a(&mut plan, bytemuck::cast_slice(&b.ids));
            fnv1a(&mut plan, bytemuck::cast_slice(&b.targets));
        }
        for v in [cfg.seed, cfg.grad_accum as u64, cfg.batch_tokens as u64] {
            fnv1a(&mut plan, &v.to_le_bytes());
        }
        let capacity = train.iter().chain(&val).map(Batch::len).max().unwrap_or(1);
        let ws = model.workspace(WorkspacePlan {
            checkpointing: cfg.gradient_checkpointing,
            dropout: cfg.lora.dropout > 0.0,
            activations: cfg.activations,
            ..WorkspacePlan::new(capacity, cfg.lora.r)
        })?;
        let opt = Optimizer::new(&model.ctx, adapter.layout.len, cfg.optimizer)?;
        let gpu = GpuAdapter::upload(&model.ctx, &adapter);
        let state = TrainState { epoch_rng: Rng::new(cfg.seed ^ 0x5eed_0fba_7c4e_5eed).state(), ..Default::default() };
        Ok(Trainer {
            model,
            cfg,
            train,
            val,
            n_samples: (dataset.train.len(), dataset.val.len()),
            adapter: gpu,
            opt,
            ws,
            state,
            best: None,
            plan_fingerprint: plan,
            cancel: CancelToken::default(),
            checkpoint: None,
        })
    }

    /// A handle that cancels [`Trainer::run`] from another thread; the run then writes a
    /// checkpoint (if one is configured) and returns with [`StopReason::Cancelled`].
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Makes `token` the one that stops this trainer, so a token handed out before the trainer
    /// existed (by a binding, say) reaches it.
    pub fn set_cancel_token(&mut self, token: CancelToken) {
        self.cancel = token;
    }

    /// Where checkpoints are written (every `checkpoint_every` steps and when the run ends).
    pub fn set_checkpoint_path(&mut self, path: impl Into<PathBuf>) {
        self.checkpoint = Some(path.into());
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.cfg.grad_accum) as u64
    }

    /// Optimizer steps the run takes in all.
    pub fn total_steps(&self) -> u64 {
        if self.cfg.max_steps > 0 { self.cfg.max_steps } else { self.cfg.epochs * self.steps_per_epoch() }
    }

    /// GPU bytes planned for training: weights, the adapter with its gradients and AdamW
    /// moments, and the workspace.
    pub fn planned_gpu_bytes(&self) -> u64 {
        self.model.weight_bytes + (4 * self.adapter.layout.len * 4) as u64 + self.ws.bytes
    }

    /// The step reached so far.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Restores a checkpoint written by a run with the same model, data and settings.
    pub fn resume(&mut self, path: &std::path::Path) -> Result<()> {
        let ck = Checkpoint::load(path)?;
        if ck.model_fingerprint != self.model.fingerprint {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint from another model (its model fingerprint is {:016x}, this model's is {:016x})",
                    ck.model_fingerprint, self.model.fingerprint
                ),
            ));
        }
        if ck.lora != self.cfg.lora || ck.params.len() != self.adapter.layout.len {
            return Err(Error::format(
                path,
                format!("checkpoint has another LoRA configuration ({:?}, expected {:?})", ck.lora, self.cfg.lora),
            ));
        }
        if ck.plan_fingerprint != self.plan_fingerprint {
            return Err(Error::format(
                path,
                "checkpoint was made with other training data or other seed, batch_tokens or grad_accum, so its \
                 data cursor means nothing here",
            ));
        }
        let q = &self.model.ctx.queue;
        q.write_buffer(&self.adapter.params, 0, bytemuck::cast_slice(&ck.params));
        q.write_buffer(&self.opt.m, 0, bytemuck::cast_slice(&ck.m));
        q.write_buffer(&self.opt.v, 0, bytemuck::cast_slice(&ck.v));
        self.opt.steps_applied = ck.state.updates;
        self.state = ck.state;
        self.best = ck.best;
        Ok(())
    }

    fn save_checkpoint(&self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let Some(path) = &self.checkpoint else { return Ok(()) };
        self.write_checkpoint(path)?;
        on_event(&Event::Checkpoint { step: self.state.step, path: path.clone() });
        Ok(())
    }

    /// Writes a checkpoint of the training state as it is now (atomically), from which
    /// [`Trainer::resume`] continues.
    pub fn write_checkpoint(&self, path: &std::path::Path) -> Result<()> {
        let ctx = &self.model.ctx;
        let n = self.adapter.layout.len;
        let ck = Checkpoint {
            state: self.state.clone(),
            lora: self.cfg.lora.clone(),
            model_fingerprint: self.model.fingerprint,
            plan_fingerprint: self.plan_fingerprint,
            params: ctx.read_f32(&self.adapter.params, n)?,
            m: ctx.read_f32(&self.opt.m, n)?,
            v: ctx.read_f32(&self.opt.v, n)?,
            best: self.best.clone(),
        };
        ck.save(path)
    }

    /// Mean loss over the validation set with the current adapter (None without one).
    pub fn evaluate(&self) -> Result<Option<f32>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (mut total, mut n) = (0f64, 0usize);
        for b in &self.val {
            let mut enc = self.model.ctx.device.create_command_encoder(&Default::default());
            self.model.forward_loss(&mut enc, &self.ws, b, &self.adapter)?;
            self.model.ctx.queue.submit([enc.finish()]);
            total += self.loss_sum(b)?;
            n += b.n_scored();
        }
        Ok(Some((total / n.max(1) as f64) as f32))
    }

    /// Sum of the per-token losses the last pass over `b` left in the workspace.
    fn loss_sum(&self, b: &Batch) -> Result<f64> {
        Ok(self.model.ctx.read_f32(&self.ws.loss, b.len())?.iter().map(|&l| f64::from(l)).sum())
    }

    /// The adapter as it is now.
    pub fn adapter(&self) -> Result<Adapter> {
        self.adapter.download(&self.model.ctx)
    }

    fn batch_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        shuffle(&mut order, &mut Rng::from_state(self.state.epoch_rng));
        order
    }

    /// Runs an evaluation and updates the best adapter; returns whether to stop early.
    fn eval_step(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<bool> {
        let Some(val_loss) = self.evaluate()? else { return Ok(false) };
        let improved = self.state.best_val_loss.is_none_or(|b| val_loss < b);
        if improved {
            self.state.best_val_loss = Some(val_loss);
            self.state.evals_since_best = 0;
            if self.cfg.keep_best {
                self.best = Some(self.model.ctx.read_f32(&self.adapter.params, self.adapter.layout.len)?);
            }
        } else {
            self.state.evals_since_best += 1;
        }
        on_event(&Event::Eval {
            step: self.state.step,
            val_loss,
            perplexity: val_loss.exp(),
            best_val_loss: self.state.best_val_loss.unwrap_or(val_loss),
            improved,
        });
        let patience = self.cfg.early_stopping_patience;
        Ok(patience > 0 && self.state.evals_since_best >= patience)
    }

    /// Trains until the step budget is spent, early stopping triggers or the run is cancelled,
    /// reporting progress through `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Outcome> {
        let on_event: &mut dyn FnMut(&Event) = &mut on_event;
        let ctx = self.model.ctx.clone();
        let total = self.total_steps();
        let per_epoch = self.steps_per_epoch();
        let schedule = Schedule {
            kind: self.cfg.lr_schedule,
            peak_lr: self.cfg.learning_rate,
            warmup_steps: self.cfg.warmup_steps,
            total_steps: total,
        };
        let planned = self.planned_gpu_bytes();
        on_event(&Event::Started {
            total_steps: total,
            start_step: self.state.step,
            train_samples: self.n_samples.0,
            val_samples: self.n_samples.1,
            batches_per_epoch: self.train.len(),
            trainable_parameters: self.adapter.layout.len,
            planned_gpu_bytes: planned,
        });
        let started = Instant::now();
        let (start_step, start_tokens) = (self.state.step, self.state.tokens);
        let mut order = self.batch_order();
        let mut last_loss = None;
        let mut reason = StopReason::Completed;
        while self.state.step < total {
            if self.cancel.is_cancelled() {
                reason = StopReason::Cancelled;
                break;
            }
            if self.state.step_in_epoch >= per_epoch {
                // Next epoch: advance the shuffling RNG past this epoch's draw.
                let mut rng = Rng::from_state(self.state.epoch_rng);
                shuffle(&mut (0..self.train.len()).collect::<Vec<_>>(), &mut rng);
                self.state.epoch_rng = rng.state();
                self.state.epoch += 1;
                self.state.step_in_epoch = 0;
                order = self.batch_order();
            }
            let first = self.state.step_in_epoch as usize * self.cfg.grad_accum;
            let group: Vec<&Batch> =
                order[first..(first + self.cfg.grad_accum).min(order.len())].iter().map(|&i| &self.train[i]).collect();
            let scored: usize = group.iter().map(|b| b.n_scored()).sum();
            let lr = schedule.lr(self.state.step);
            let mut loss_sum = 0f64;
            for (k, &b) in group.iter().enumerate() {
                // Dropout masks follow from (LoRA seed, step, micro-batch), so a resumed run
                // draws the same ones.
                let seeded;
                let b = if self.cfg.lora.dropout > 0.0 {
                    let mut h = self.cfg.lora.seed;
                    fnv1a(&mut h, &self.state.step.to_le_bytes());
                    fnv1a(&mut h, &(k as u64).to_le_bytes());
                    seeded = Batch { seed: (h ^ (h >> 32)) as u32, ..b.clone() };
                    &seeded
                } else {
                    b
                };
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                if k == 0 {
                    self.opt.zero_grad(&mut enc);
                }
                let scale = 1.0 / scored.max(1) as f32;
                self.model.forward_backward(&mut enc, &self.ws, b, &self.adapter, &self.opt.grads, scale)?;
                if k + 1 == group.len() {
                    self.opt.record_step(&ctx, &mut enc, &self.adapter.params, lr)?;
                }
                ctx.queue.submit([enc.finish()]);
                loss_sum += self.loss_sum(b)?;
            }
            let loss = (loss_sum / scored.max(1) as f64) as f32;
            let norm = ctx.read_f32(&self.opt.norm, 1)?[0];
            let applied = self.opt.commit(norm) && loss.is_finite();
            self.state.step += 1;
            self.state.step_in_epoch += 1;
            self.state.updates = self.opt.steps_applied;
            self.state.tokens += group.iter().map(|b| b.len() as u64).sum::<u64>();
            if !applied {
                self.state.bad_steps += 1;
                let what = format!("loss {loss}, gradient norm {norm}");
                if self.state.bad_steps >= self.cfg.max_bad_steps {
                    return Err(Error::Diverged {
                        step: self.state.step,
                        what: format!(
                            "{} consecutive steps had a non-finite loss or gradient (last: {what}); the last \
                             checkpoint was kept. Lower the learning rate or check the data",
                            self.state.bad_steps
                        ),
                    });
                }
                on_event(&Event::Warning {
                    step: self.state.step,
                    message: format!("step skipped: non-finite {what}; the adapter was not updated"),
                });
                continue;
            }
            self.state.bad_steps = 0;
            last_loss = Some(loss);
            let elapsed = started.elapsed().as_secs_f64();
            let done = (self.state.step - start_step) as f64;
            on_event(&Event::Step {
                step: self.state.step,
                total_steps: total,
                epoch: self.state.epoch as f64 + self.state.step_in_epoch as f64 / per_epoch.max(1) as f64,
                loss,
                lr,
                grad_norm: norm,
                tokens: self.state.tokens,
                tokens_per_s: (self.state.tokens - start_tokens) as f64 / elapsed.max(1e-9),
                eta_s: elapsed / done * (total - self.state.step) as f64,
                gpu_memory_bytes: ctx.allocated_bytes().unwrap_or(planned),
            });
            let epoch_end = self.state.step_in_epoch == per_epoch;
            let eval_now = match self.cfg.eval_every {
                0 => epoch_end || self.state.step == total,
                n => self.state.step.is_multiple_of(n) || self.state.step == total,
            };
            if eval_now && self.eval_step(on_event)? {
                reason = StopReason::EarlyStopped;
                break;
            }
            let every = self.cfg.checkpoint_every;
            if every > 0 && self.state.step.is_multiple_of(every) && self.state.step < total {
                self.save_checkpoint(on_event)?;
            }
        }
        // A run that ends on skipped steps keeps the last good checkpoint.
        if self.state.bad_steps == 0 {
            self.save_checkpoint(on_event)?;
        }
        let mut adapter = self.adapter()?;
        if self.cfg.keep_best
            && let Some(best) = &self.best
        {
            adapter.params = best.clone();
        }
        on_event(&Event::Finished { step: self.state.step, reason, best_val_loss: self.state.best_val_loss });
        Ok(Outcome { reason, steps: self.state.step, last_loss, best_val_loss: self.state.best_val_loss, adapter })
    }
}
