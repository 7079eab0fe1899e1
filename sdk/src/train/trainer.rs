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

use super::answers::{AnswerEval, EvalAnswers};
use super::auto::Choice;
use super::checkpoint::{Checkpoint, TrainState};
use super::dpo::{DpoConfig, DpoReference, Method, Rewards};
use super::optimizer::{AdamwConfig, Optimizer};
use super::plan::{self, ModelLimits, Resolved, Round, RunPlan, choice};
use super::schedule::{Schedule, ScheduleKind};
use crate::data::{DataConfig, Dataset};
use crate::error::{Error, Result};
use crate::gpu::PendingRead;
use crate::gpu::launch::{DPO_STATS, DpoLoss};
use crate::infer;
use crate::lora::{Adapter, GpuAdapter, Layout, LoraConfig};
use crate::model::llama::Model;
use crate::model::training::{Batch, DpoPass, Precision, Reference, Workspace, WorkspacePlan};
use crate::prim::{FNV_OFFSET, fnv1a};
use crate::score::AnswerScores;

/// Everything that decides a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What is trained: supervised fine-tuning on chat or text records, or DPO on preference
    /// pairs.
    pub method: Method,
    /// DPO's beta, loss and reference (with `method = "dpo"`).
    pub dpo: DpoConfig,
    /// The adapter: rank, alpha, dropout, target modules.
    pub lora: LoraConfig,
    /// How the data is read, cut into samples and split.
    pub data: DataConfig,
    /// AdamW's betas, epsilon, weight decay and gradient clipping.
    pub optimizer: AdamwConfig,
    /// Peak learning rate. Unset: chosen for the run's length and the adapter's rank, and a
    /// tenth of that for DPO ([`super::auto::learning_rate`], [`super::auto::DPO_LR_FACTOR`]).
    pub learning_rate: Option<f32>,
    /// How the learning rate goes from the peak to the end of the run, after the warmup.
    pub lr_schedule: ScheduleKind,
    /// Steps of linear warmup from 0 to the peak. Unset: 3 % of the steps ([`super::auto::warmup_steps`]).
    pub warmup_steps: Option<u64>,
    /// Passes over the training set (ignored when `max_steps` is set). Unset: chosen from the
    /// data's size ([`super::auto::epochs`]).
    pub epochs: Option<u64>,
    /// Optimizer steps to take. Unset: `epochs` decides.
    pub max_steps: Option<u64>,
    /// Tokens per packed micro-batch (samples laid end to end, never attending to each other).
    /// Unset: chosen from the data's size ([`super::auto::batch_tokens`]).
    pub batch_tokens: Option<usize>,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    /// Evaluate on the validation set every this many steps; 0 evaluates at the end of each
    /// epoch.
    pub eval_every: u64,
    /// Stop after this many evaluations without a better validation loss; 0 never stops early.
    pub early_stopping_patience: u32,
    /// Return (and save) the adapter with the best validation loss rather than the last one.
    /// Unset: on only when the validation loss is meaningful
    /// ([`crate::data::Validation::meaningful`]: the user's `val_data`, or a split the automatic
    /// rule judged sound), so a held-out fact cannot make the run return an untrained adapter.
    pub keep_best: Option<bool>,
    /// Keep only each layer's input and recompute the layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Storage of the activations saved for the backward pass: "f32", or "f16" (mixed
    /// precision: half the activation memory; arithmetic, LoRA weights, gradients and AdamW
    /// moments stay f32).
    pub activations: Precision,
    /// Seed of the batch order.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: not by step count).
    pub checkpoint_every: u64,
    /// Write a checkpoint once this many seconds have passed since the last one (0: not by
    /// time), so that a killed run loses at most this much training. Either rule, whichever
    /// comes first; with both 0, only when training ends or is cancelled.
    pub checkpoint_every_s: u64,
    /// Consecutive non-finite steps (skipped) after which training stops with an error.
    pub max_bad_steps: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Sft,
            dpo: DpoConfig::default(),
            lora: LoraConfig::default(),
            data: DataConfig::default(),
            optimizer: AdamwConfig::default(),
            learning_rate: None,
            lr_schedule: ScheduleKind::Cosine,
            warmup_steps: None,
            epochs: None,
            max_steps: None,
            batch_tokens: None,
            grad_accum: 1,
            eval_every: 0,
            early_stopping_patience: 0,
            keep_best: None,
            gradient_checkpointing: true,
            activations: Precision::F32,
            seed: 0,
            checkpoint_every: 0,
            checkpoint_every_s: 600,
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
        p.extend(self.dpo.problems().into_iter().map(|s| format!("dpo: {s}")));
        if let Some(lr) = self.learning_rate
            && !(lr.is_finite() && lr > 0.0)
        {
            p.push(format!("learning_rate must be a finite number > 0 (got {lr})"));
        }
        if self.epochs == Some(0) {
            p.push("epochs must be at least 1 (leave it unset to choose it from the data)".into());
        }
        if self.max_steps == Some(0) {
            p.push("max_steps must be at least 1 (leave it unset to let epochs decide)".into());
        }
        if let Some(b) = self.batch_tokens
            && b < 2
        {
            p.push(format!("batch_tokens must be at least 2 (got {b})"));
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
    /// The run starts: what it will do.
    Started {
        /// Optimizer steps the run will have taken when it completes.
        total_steps: u64,
        /// The step training starts from (non-zero when resumed).
        start_step: u64,
        /// Samples trained.
        train_samples: usize,
        /// Samples that validate.
        val_samples: usize,
        /// Packed batches in one pass over the training samples.
        batches_per_epoch: usize,
        /// Entries of the adapter's A and B matrices.
        trainable_parameters: usize,
        /// Planned GPU bytes: weights, adapter with gradients and moments, and the workspace.
        planned_gpu_bytes: u64,
        /// The settings chosen from the data (those the configuration left unset), and how the
        /// validation samples were chosen.
        chosen: Vec<Choice>,
    },
    /// An optimizer step landed (a step late while the next one runs; see [`Trainer::run`]).
    Step {
        /// The step's number, from 1.
        step: u64,
        /// As in `Started`.
        total_steps: u64,
        /// Fractional epochs done.
        epoch: f64,
        /// Mean loss over the step's trained tokens.
        loss: f32,
        /// The learning rate the step used.
        lr: f32,
        /// The gradient's norm before clipping.
        grad_norm: f32,
        /// Tokens trained on so far (padding excluded), in this run and any it resumed.
        tokens: u64,
        /// Tokens a second since the run started.
        tokens_per_s: f64,
        /// Seconds to the end of the run at that rate.
        eta_s: f64,
        /// Bytes the driver reports allocated, or the planned bytes where it reports none.
        gpu_memory_bytes: u64,
        /// DPO: the step's reward metrics (its `loss` is then the mean DPO loss of its pairs).
        #[serde(skip_serializing_if = "Option::is_none")]
        rewards: Option<Rewards>,
    },
    /// The validation samples were scored after a step.
    Eval {
        /// The step after which they were scored.
        step: u64,
        /// Mean loss over their trained tokens.
        val_loss: f32,
        /// `exp(val_loss)`.
        perplexity: f32,
        /// The lowest validation loss so far, this one included.
        best_val_loss: f32,
        /// Whether this one is the lowest so far.
        improved: bool,
        /// DPO: the validation pairs' reward metrics (`val_loss` is their mean DPO loss).
        #[serde(skip_serializing_if = "Option::is_none")]
        rewards: Option<Rewards>,
        /// The held-out answers' mean scores, base and adapter, when the run scores answers
        /// ([`Trainer::score_answers_at_evals`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        answers: Option<EvalAnswers>,
    },
    /// Something the user should know and may act on (a skipped step, a rising validation
    /// loss, a checkpoint that could not be read).
    Warning {
        /// The step it concerns.
        step: u64,
        /// What happened, and what to do.
        message: String,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// The step it holds.
        step: u64,
        /// Where it was written.
        path: PathBuf,
    },
    /// The run ended.
    Finished {
        /// The last step taken.
        step: u64,
        /// Why it ended.
        reason: StopReason,
        /// The lowest validation loss, if the run validated.
        best_val_loss: Option<f32>,
    },
}

/// Why training ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every planned step was taken.
    Completed,
    /// The validation loss stopped improving for `early_stopping_patience` evaluations.
    EarlyStopped,
    /// A [`CancelToken`] stopped it.
    Cancelled,
}

/// The result of [`Trainer::run`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why the run ended.
    pub reason: StopReason,
    /// The optimizer steps taken, with those of a resumed checkpoint.
    pub steps: u64,
    /// Mean loss of the last step.
    pub last_loss: Option<f32>,
    /// The lowest validation loss, if the run validated.
    pub best_val_loss: Option<f32>,
    /// The trained adapter: the best one by validation loss with `keep_best`, else the last.
    pub adapter: Adapter,
    /// The step after which `adapter` was taken.
    pub adapter_step: u64,
}

/// A handle that stops a running [`Trainer`] from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the trainer to stop after the step it is running (it then writes a checkpoint, if
    /// one is configured).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Trains a LoRA adapter on a model.
#[derive(Debug)]
pub struct Trainer {
    model: Arc<Model>,
    /// The configuration with every automatic choice filled in.
    cfg: TrainConfig,
    run: Resolved,
    chosen: Vec<Choice>,
    /// The training batches of each draw of the data (one unless records are chained: see
    /// [`Dataset::rounds`]); epoch e trains draw e mod their number, and every draw has as many
    /// batches.
    rounds: Vec<Vec<Batch>>,
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
    /// DPO's loss and reference (None for supervised training).
    dpo: Option<Dpo>,
    /// Why [`Trainer::resume`] fell back to the checkpoint before the one asked for, reported
    /// by the next run.
    resume_warning: Option<String>,
    /// The run [`Trainer::step`] is driving, until [`Trainer::finish`].
    running: Option<Running>,
    /// The held-out exchanges answered at each evaluation, and the base model's mean scores
    /// once known.
    answers: Option<(AnswerEval, Option<AnswerScores>)>,
}

/// What training will hold on the GPU, planned before it allocates.
#[derive(Debug, Clone, Copy)]
pub struct TrainingBytes {
    /// The model's weights, already there.
    pub weights: u64,
    /// The adapter, its gradients and AdamW's two moments.
    pub adapter: u64,
    /// Activations and scratch for batches of `tokens` tokens.
    pub workspace: u64,
    /// The tokens of the largest batch the workspace holds.
    pub tokens: usize,
}

impl TrainingBytes {
    /// What to change when training's buffers do not fit.
    pub const ADVICE: &str =
        "lower batch_tokens or data.max_len, keep gradient_checkpointing on, or store activations as f16";

    /// Every planned byte: weights, adapter and workspace.
    pub fn total(&self) -> u64 {
        self.weights + self.adapter + self.workspace
    }

    /// An error, before anything is allocated, when the adapter and workspace cannot fit next to
    /// the weights in `memory` (unknown memory passes: the driver's own error then stands).
    pub fn check(&self, memory: Option<crate::gpu::GpuMemory>) -> Result<()> {
        let Some(m) = memory else { return Ok(()) };
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        m.check_fits(self.adapter + self.workspace, self.weights).map_err(|why| {
            Error::invalid(
                "training settings",
                format!(
                    "{why}: planned {:.0} MiB of weights, {:.0} MiB of adapter, gradients and AdamW moments, and {:.0} \
                     MiB of activations for batches of {} tokens; {}",
                    mib(self.weights),
                    mib(self.adapter),
                    mib(self.workspace),
                    self.tokens,
                    Self::ADVICE
                ),
            )
        })
    }
}

fn batches(round: &Round) -> Result<Vec<Batch>> {
    (0..round.batches.len())
        .map(|b| Batch::pack_units(round.batch(b).map(|s| (s.ids.as_slice(), s.train.as_slice(), s.rejected_at))))
        .collect()
}

impl Trainer {
    /// Prepares training of a fresh adapter (PEFT's initialization, seeded by `cfg.lora.seed`).
    pub fn new(model: Arc<Model>, dataset: &Dataset, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        // Before the adapter is made on the host, which a rank past the GPU's bindings would
        // make for nothing.
        model.check_adapter_binds(&Layout::new(&model.config, &cfg.lora)?)?;
        let adapter = Adapter::new(&model.config, cfg.lora.clone())?;
        Self::with_adapter(model, dataset, cfg, adapter)
    }

    /// Prepares training that starts from `adapter` (its configuration replaces `cfg.lora`).
    ///
    /// Settings left unset are chosen from the data ([`super::auto`]); [`Trainer::config`] gives them
    /// all and [`Trainer::chosen`] the automatic ones.
    pub fn with_adapter(model: Arc<Model>, dataset: &Dataset, mut cfg: TrainConfig, adapter: Adapter) -> Result<Self> {
        cfg.lora = adapter.config.clone();
        model.check_adapter_binds(&adapter.layout)?;
        let limits = ModelLimits {
            max_context: model.max_context,
            max_batch_tokens: model.max_batch_tokens(cfg.lora.r, cfg.lora.dropout > 0.0),
        };
        let RunPlan { config: mut cfg, mut chosen, rounds, val, resolved: run } = RunPlan::new(dataset, cfg, limits)?;
        let batch_tokens = cfg.batch_tokens.unwrap_or_default();
        let rounds: Vec<Vec<Batch>> = rounds.iter().map(batches).collect::<Result<_>>()?;
        let val = batches(&val)?;
        let mut fingerprint = FNV_OFFSET;
        for b in rounds.iter().flatten() {
            fnv1a(&mut fingerprint, bytemuck::cast_slice(&b.ids));
            fnv1a(&mut fingerprint, bytemuck::cast_slice(&b.targets));
        }
        for v in [cfg.seed, cfg.grad_accum as u64, batch_tokens as u64] {
            fnv1a(&mut fingerprint, &v.to_le_bytes());
        }
        if cfg.method == Method::Dpo {
            let (reference, _) = cfg.dpo.reference_choice();
            fnv1a(&mut fingerprint, format!("{:?} {reference:?}", cfg.dpo.kernel_loss()).as_bytes());
        }
        let capacity = rounds.iter().flatten().chain(&val).map(Batch::len).max().unwrap_or(1);
        let ws_plan = WorkspacePlan {
            checkpointing: cfg.gradient_checkpointing,
            dropout: cfg.lora.dropout > 0.0,
            activations: cfg.activations,
            ..WorkspacePlan::new(capacity, cfg.lora.r)
        };
        // Refused before anything is allocated where the backend reports the GPU's memory.
        let in_step = cfg.method == Method::Dpo && cfg.dpo.reference_choice().0 == DpoReference::InStep;
        let needs = TrainingBytes {
            weights: model.weight_bytes,
            // Parameters, gradients and AdamW's two moments; a frozen copy for a DPO reference
            // computed in the steps.
            adapter: ((4 + usize::from(in_step)) * adapter.layout.len * 4) as u64,
            workspace: model.workspace_bytes(ws_plan)?,
            tokens: capacity,
        };
        needs.check(model.ctx.memory())?;
        let (ws, opt, gpu) =
            model.ctx.allocating("training's buffers", needs.total(), TrainingBytes::ADVICE, || {
                let ws = model.workspace(ws_plan)?;
                let opt = Optimizer::new(&model.ctx, adapter.layout.len, cfg.optimizer)?;
                Ok((ws, opt, GpuAdapter::upload(&model.ctx, &adapter)))
            })?;
        let dpo = match cfg.method {
            Method::Sft => None,
            Method::Dpo => {
                let (source, why) = cfg.dpo.reference_choice();
                if cfg.dpo.reference.is_none() {
                    chosen.push(choice("dpo.reference", "precomputed", why));
                }
                let reference = match source {
                    DpoReference::InStep => DpoRef::InStep(GpuAdapter::upload(&model.ctx, &adapter)),
                    DpoReference::Precomputed => {
                        let logps = |batches: &[Batch]| -> Result<Vec<Vec<f32>>> {
                            batches.iter().map(|b| reference_logps(&model, &ws, b, &gpu)).collect()
                        };
                        let rounds = rounds.iter().map(|r| logps(r)).collect::<Result<_>>()?;
                        DpoRef::Precomputed { rounds, val: logps(&val)? }
                    }
                };
                cfg.dpo.reference = Some(source);
                Some(Dpo { loss: cfg.dpo.kernel_loss(), reference })
            }
        };
        let state = TrainState { epoch_rng: plan::initial_epoch_rng(cfg.seed), ..Default::default() };
        Ok(Trainer {
            model,
            cfg,
            run,
            chosen,
            rounds,
            val,
            n_samples: (dataset.train.len(), dataset.val.len()),
            adapter: gpu,
            opt,
            ws,
            state,
            best: None,
            plan_fingerprint: fingerprint,
            cancel: CancelToken::default(),
            checkpoint: None,
            dpo,
            resume_warning: None,
            running: None,
            answers: None,
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
        self.rounds[0].len().div_ceil(self.cfg.grad_accum) as u64
    }

    /// Optimizer steps the run takes in all.
    pub fn total_steps(&self) -> u64 {
        self.run.total_steps
    }

    /// The settings of this run, with every automatic choice filled in: running again with
    /// them gives the same run.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The settings chosen from the data, with the reasons.
    pub fn chosen(&self) -> &[Choice] {
        &self.chosen
    }

    /// GPU bytes planned for training: weights, the adapter with its gradients and AdamW
    /// moments, and the workspace.
    pub fn planned_gpu_bytes(&self) -> u64 {
        self.model.weight_bytes + (4 * self.adapter.layout.len * 4) as u64 + self.ws.bytes
    }

    /// The optimizer steps taken so far (with those of a resumed checkpoint).
    pub fn steps_done(&self) -> u64 {
        self.state.step
    }

    /// Restores a checkpoint written by a run with the same model, data and settings. A
    /// damaged one (a disk fault, a copy cut short) gives way to the one before it, which the
    /// next run's events report as a warning.
    pub fn resume(&mut self, path: &std::path::Path) -> Result<()> {
        let (ck, warning) = Checkpoint::load_or_previous(path)?;
        self.resume_warning = warning;
        // A run that step() was driving ends here; the next step starts one from the checkpoint.
        self.running = None;
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
        self.opt.set_steps_applied(&self.model.ctx, ck.state.updates);
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

    /// Mean loss over the validation set with the current adapter (None without one): over
    /// its trained tokens, or with DPO over its pairs.
    pub fn evaluate(&self) -> Result<Option<f32>> {
        Ok(self.evaluate_with_rewards()?.map(|(loss, _)| loss))
    }

    /// [`Trainer::evaluate`], with DPO's reward metrics over the validation pairs.
    pub fn evaluate_with_rewards(&self) -> Result<Option<(f32, Option<Rewards>)>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        if let Some(dpo) = &self.dpo {
            let mut stats = Vec::new();
            for (i, b) in self.val.iter().enumerate() {
                let mut enc = self.model.ctx.encoder_with(self.ws.binds());
                let pass = DpoPass { loss: dpo.loss, reference: dpo.reference.of(None, i) };
                self.model.forward_dpo(&mut enc, &self.ws, b, &self.adapter, pass)?;
                self.model.ctx.submit([enc.finish()]);
                stats.extend(self.model.ctx.read_f32(&self.ws.dpo_stats, DPO_STATS * b.pairs.len())?);
            }
            let (loss, rewards) = Rewards::of(&stats);
            return Ok(Some((loss, Some(rewards))));
        }
        let (mut total, mut n) = (0f64, 0usize);
        for b in &self.val {
            let mut enc = self.model.ctx.encoder_with(self.ws.binds());
            self.model.forward_loss(&mut enc, &self.ws, b, &self.adapter)?;
            self.model.ctx.submit([enc.finish()]);
            total += self.loss_sum(b)?;
            n += b.n_scored();
        }
        Ok(Some(((total / n.max(1) as f64) as f32, None)))
    }

    /// Sum of the per-token losses the last pass over `b` left in the workspace.
    fn loss_sum(&self, b: &Batch) -> Result<f64> {
        Ok(self.model.ctx.read_f32(&self.ws.loss, b.len())?.iter().map(|&l| f64::from(l)).sum())
    }

    /// The adapter as it is now.
    pub fn adapter(&self) -> Result<Adapter> {
        self.adapter.download(&self.model.ctx)
    }

    /// Words of a micro-batch's losses in a step's readback: one a token, or DPO's statistics
    /// of up to one pair for every two tokens.
    fn readback_stride(&self) -> usize {
        let c = self.ws.capacity;
        if self.dpo.is_some() { c.max(DPO_STATS * c.div_ceil(2)) } else { c }
    }

    fn batch_order(&self) -> Vec<usize> {
        plan::epoch_order(self.state.epoch_rng, self.rounds[0].len())
    }

    /// Answers the held-out exchanges at every evaluation point with the adapter as it is then,
    /// and reports their mean scores (exact match, token F1, ROUGE-L) in [`Event::Eval`] beside
    /// the base model's, as `edgetune eval --generate` does for a finished adapter. Evaluation
    /// points need validation samples (`eval_every` sets when); a run without them is an error
    /// here, as is an exchange whose prompt does not fit the model's context (by its file and
    /// line). Generation keeps its own small KV caches, decoding buffers for up to
    /// [`crate::infer::ANSWER_ROWS`] rows and a copy of the adapter beside training's memory while it
    /// runs ([`crate::infer::chat_rows`]).
    pub fn score_answers_at_evals(&mut self, eval: AnswerEval) -> Result<()> {
        eval.check()?;
        if self.val.is_empty() {
            return Err(Error::invalid(
                "answer evaluation",
                "runs at evaluation points, and this run has no validation samples: give validation data (val_data)",
            ));
        }
        // Every prompt fits the context, or the run would stop at its first evaluation.
        let requests: Vec<_> = eval.exchanges.iter().map(|x| infer::ChatRequest::exchange(x, None)).collect();
        infer::chat_prompts(&self.model, &eval.tokenizer, &requests)?;
        self.answers = Some((eval, None));
        Ok(())
    }

    /// The held-out answers' mean scores now, if the run scores answers.
    fn answer_scores(&mut self) -> Result<Option<EvalAnswers>> {
        let Some((eval, base)) = &mut self.answers else { return Ok(None) };
        eval.scores(&self.model, &self.adapter, base).map(Some)
    }

    /// Runs an evaluation and updates the best adapter; returns whether to stop early.
    fn eval_step(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<bool> {
        let Some((val_loss, rewards)) = self.evaluate_with_rewards()? else { return Ok(false) };
        let train_loss = self.state.window_loss();
        self.state.window = (0.0, 0);
        // A NaN (or infinite) validation loss is never the best.
        let improved = val_loss.is_finite() && self.state.best_val_loss.is_none_or(|b| val_loss < b);
        if improved {
            self.state.best_val_loss = Some(val_loss);
            self.state.best_step = self.state.step;
            self.state.train_loss_at_best = train_loss;
            self.state.evals_since_best = 0;
            if self.run.keep_best {
                self.best = Some(self.model.ctx.read_f32(&self.adapter.params, self.adapter.layout.len)?);
            }
        } else {
            self.state.evals_since_best += 1;
        }
        let answers = self.answer_scores()?;
        on_event(&Event::Eval {
            step: self.state.step,
            val_loss,
            perplexity: val_loss.exp(),
            best_val_loss: self.state.best_val_loss.unwrap_or(val_loss),
            improved,
            rewards,
            answers,
        });
        if let (false, false, Some(best), Some(before), Some(now)) =
            (improved, self.state.diverge_warned, self.state.best_val_loss, self.state.train_loss_at_best, train_loss)
            && now < before
        {
            self.state.diverge_warned = true;
            on_event(&Event::Warning { step: self.state.step, message: self.divergence(best, val_loss, before, now) });
        }
        let patience = self.cfg.early_stopping_patience;
        Ok(patience > 0 && self.state.evals_since_best >= patience)
    }

    /// The warning for a validation loss that rises while the training loss falls.
    fn divergence(&self, best: f32, val_loss: f32, train_before: f32, train_now: f32) -> String {
        let (best_step, step) = (self.state.best_step, self.state.step);
        let what = format!(
            "the validation loss rose from {best:.4} at step {best_step} to {val_loss:.4} at step {step} while the \
             training loss fell from {train_before:.4} to {train_now:.4}"
        );
        if self.run.keep_best {
            format!(
                "{what}. The adapter of step {best_step} is kept (keep_best), so later learning is set aside. If the \
                 validation records state facts that no training record states, that throws the learning away: \
                 set keep_best = false (or val_fraction = 0 to train on every record), or give held-out records \
                 that ask about trained facts with val_data. If they are like the training records, the model is \
                 overfitting: fewer epochs or a lower learning_rate help."
            )
        } else {
            format!(
                "{what}. The final adapter will be returned (keep_best is off); the best validation loss was at \
                 step {best_step}. If the validation records are like the training records, the model is \
                 overfitting: lower epochs or learning_rate, or set keep_best = true. If they state facts that no \
                 training record states, their loss cannot fall: train on every record (val_fraction = 0) or give \
                 held-out records that ask about trained facts with val_data."
            )
        }
    }

    /// Trains until the step budget is spent, early stopping triggers or the run is cancelled,
    /// reporting progress through `on_event`: [`Trainer::step`] until it says the run is over,
    /// then [`Trainer::finish`].
    ///
    /// The host does not wait for the GPU between steps: step N+1 is recorded and submitted
    /// while step N runs, and N's losses, gradient norm and update count come back through a
    /// pair of staging buffers mapped asynchronously; its events are sent when they land,
    /// after N+1 was submitted. Steps whose state must be seen (an evaluation, a checkpoint,
    /// the last step) land before anything else is recorded, as does the step in flight when
    /// the run is cancelled, so evaluations, checkpoints and the final adapter see the state
    /// after exactly their step. A non-finite step is skipped on the GPU, which counts the
    /// updates it applies, so the next step uses the right bias corrections without waiting.
    /// When a run fails on too many non-finite steps, the step after the last one reported may
    /// already have run on the GPU; the checkpoint on disk is the last good one.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Outcome> {
        let on_event: &mut dyn FnMut(&Event) = &mut on_event;
        let reason = loop {
            if let Some(reason) = self.step(on_event)? {
                break reason;
            }
        };
        self.finish(reason, on_event)
    }

    /// Records and submits one optimizer step, for an app that drives training from its own
    /// loop (a UI's frame loop, say); [`Trainer::run`] is this in a loop. The first call starts
    /// the run (the `Started` event). Events of a step may arrive with the next call (see
    /// [`Trainer::run`]). Returns why the run is over once it is (the step budget spent, the run
    /// cancelled, or early stopping), after which [`Trainer::finish`] gives the outcome; until
    /// then `None`.
    pub fn step(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<Option<StopReason>> {
        let mut run = match self.running.take() {
            Some(run) => run,
            None => self.start(on_event),
        };
        let out = self.step_in(&mut run, on_event);
        self.running = Some(run);
        out
    }

    /// Ends the run that [`Trainer::step`] drove (starting one if none was): lands the step in
    /// flight, writes the final checkpoint where one is configured, and returns the outcome
    /// with the adapter (the best one by validation loss where `keep_best` is on).
    pub fn finish(&mut self, reason: StopReason, on_event: &mut dyn FnMut(&Event)) -> Result<Outcome> {
        let mut run = match self.running.take() {
            Some(run) => run,
            None => self.start(on_event),
        };
        if let Some(f) = run.in_flight.take() {
            run.last_loss = self.land(f, &run.clock, on_event)?.or(run.last_loss);
        }
        // A run that ends on skipped steps keeps the last good checkpoint; one that has just
        // written this step's does not write it again (which would also push the step before
        // out of the previous-checkpoint slot).
        if self.state.bad_steps == 0 && run.saved_step != Some(self.state.step) {
            self.save_checkpoint(on_event)?;
        }
        let mut adapter = self.adapter()?;
        let mut adapter_step = self.state.step;
        if self.run.keep_best
            && let Some(best) = &self.best
        {
            adapter.params = best.clone();
            adapter_step = self.state.best_step;
        }
        on_event(&Event::Finished { step: self.state.step, reason, best_val_loss: self.state.best_val_loss });
        Ok(Outcome {
            reason,
            steps: self.state.step,
            last_loss: run.last_loss,
            best_val_loss: self.state.best_val_loss,
            adapter,
            adapter_step,
        })
    }

    /// Starts a run: the `Started` event (and a resume's warning), the clock and the readback
    /// buffers.
    fn start(&mut self, on_event: &mut dyn FnMut(&Event)) -> Running {
        let total = self.total_steps();
        let schedule = Schedule {
            kind: self.cfg.lr_schedule,
            peak_lr: self.run.learning_rate,
            warmup_steps: self.run.warmup_steps,
            total_steps: total,
        };
        let planned = self.planned_gpu_bytes();
        on_event(&Event::Started {
            total_steps: total,
            start_step: self.state.step,
            train_samples: self.n_samples.0,
            val_samples: self.n_samples.1,
            batches_per_epoch: self.rounds[0].len(),
            trainable_parameters: self.adapter.layout.len,
            planned_gpu_bytes: planned,
            chosen: self.chosen.clone(),
        });
        if let Some(message) = self.resume_warning.take() {
            on_event(&Event::Warning { step: self.state.step, message });
        }
        let clock = RunClock {
            total,
            start_step: self.state.step,
            start_tokens: self.state.tokens,
            started: Instant::now(),
            planned,
        };
        // Two staging buffers, used in turn: the norm and update count, then each
        // micro-batch's per-token losses.
        let ctx = &self.model.ctx;
        let slot_bytes = (READBACK_HEADER + self.cfg.grad_accum * self.readback_stride()) as u64 * 4;
        Running {
            schedule,
            clock,
            slots: [ctx.staging("step readback", slot_bytes), ctx.staging("step readback", slot_bytes)],
            in_flight: None,
            last_checkpoint: Instant::now(),
            saved_step: None,
            order: self.batch_order(),
            last_loss: None,
        }
    }

    /// One step of the run `r` (see [`Trainer::step`]).
    fn step_in(&mut self, r: &mut Running, on_event: &mut dyn FnMut(&Event)) -> Result<Option<StopReason>> {
        let (total, per_epoch) = (r.clock.total, self.steps_per_epoch());
        let done = self.state.step >= total;
        if done || self.cancel.is_cancelled() {
            if let Some(f) = r.in_flight.take() {
                r.last_loss = self.land(f, &r.clock, on_event)?.or(r.last_loss);
            }
            return Ok(Some(if done { StopReason::Completed } else { StopReason::Cancelled }));
        }
        if self.state.step_in_epoch >= per_epoch {
            // Next epoch: advance the shuffling RNG past this epoch's draw.
            self.state.epoch_rng = plan::next_epoch_rng(self.state.epoch_rng, self.rounds[0].len());
            self.state.epoch += 1;
            self.state.step_in_epoch = 0;
            r.order = self.batch_order();
        }
        let first = self.state.step_in_epoch as usize * self.cfg.grad_accum;
        let group: Vec<usize> = r.order[first..(first + self.cfg.grad_accum).min(r.order.len())].to_vec();
        let lr = r.schedule.lr(self.state.step);
        let draw = &self.rounds[self.state.epoch as usize % self.rounds.len()];
        let lens: Vec<usize> = group.iter().map(|&i| draw[i].len()).collect();
        let pairs: Vec<usize> = group.iter().map(|&i| draw[i].pairs.len()).collect();
        // What the step's loss is the mean over: trained tokens, or DPO's pairs.
        let scored: usize =
            group.iter().map(|&i| if self.dpo.is_some() { draw[i].pairs.len() } else { draw[i].n_scored() }).sum();
        let slot = r.slots[(self.state.step % 2) as usize].clone();
        let read = self.record_step(&group, scored, lr, &slot)?;
        self.state.step += 1;
        self.state.step_in_epoch += 1;
        self.state.tokens += lens.iter().sum::<usize>() as u64;
        let flight = InFlight {
            step: self.state.step,
            epoch: self.state.epoch as f64 + self.state.step_in_epoch as f64 / per_epoch.max(1) as f64,
            lr,
            tokens: self.state.tokens,
            lens,
            pairs,
            scored,
            read,
        };
        // The previous step lands now that this one is queued behind it.
        if let Some(f) = r.in_flight.take() {
            r.last_loss = self.land(f, &r.clock, on_event)?.or(r.last_loss);
        }
        let step = self.state.step;
        let epoch_end = self.state.step_in_epoch == per_epoch;
        let eval_now = match self.cfg.eval_every {
            0 => epoch_end || step == total,
            n => step.is_multiple_of(n) || step == total,
        };
        let every = self.cfg.checkpoint_every;
        let every_s = self.cfg.checkpoint_every_s;
        let due = (every > 0 && step.is_multiple_of(every))
            || (every_s > 0 && r.last_checkpoint.elapsed().as_secs_f64() >= every_s as f64);
        let checkpoint_now = due && step < total && self.checkpoint.is_some();
        if !(eval_now || checkpoint_now || step == total) {
            r.in_flight = Some(flight);
            return Ok(None);
        }
        // A step skipped as non-finite is neither evaluated nor checkpointed.
        let Some(loss) = self.land(flight, &r.clock, on_event)? else { return Ok(None) };
        r.last_loss = Some(loss);
        if eval_now && self.eval_step(on_event)? {
            return Ok(Some(StopReason::EarlyStopped));
        }
        if checkpoint_now {
            self.save_checkpoint(on_event)?;
            r.last_checkpoint = Instant::now();
            r.saved_step = Some(self.state.step);
        }
        Ok(None)
    }

    /// Records and submits one optimizer step over the training batches `group` (gradients
    /// accumulated over them, `scored` tokens in all) at learning rate `lr`, with copies of its
    /// losses, gradient norm, update count and non-finite flag into `slot`, which starts being
    /// mapped.
    fn record_step(&mut self, group: &[usize], scored: usize, lr: f32, slot: &wgpu::Buffer) -> Result<PendingRead> {
        let ctx = self.model.ctx.clone();
        let stride = self.readback_stride();
        let round = self.state.epoch as usize % self.rounds.len();
        for (k, &i) in group.iter().enumerate() {
            let b = &self.rounds[self.state.epoch as usize % self.rounds.len()][i];
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
            let mut enc = ctx.encoder_with(self.ws.binds());
            if k == 0 {
                self.opt.zero_grad(&mut enc);
            }
            let scale = 1.0 / scored.max(1) as f32;
            let at = ((READBACK_HEADER + k * stride) * 4) as u64;
            if let Some(dpo) = &self.dpo {
                let pass = DpoPass { loss: dpo.loss, reference: dpo.reference.of(Some(round), group[k]) };
                self.model.forward_backward_dpo(&mut enc, &self.ws, b, &self.adapter, &self.opt.grads, pass, scale)?;
                let n = DPO_STATS * b.pairs.len();
                self.opt.check_losses(&ctx, &mut enc, &self.ws.dpo_stats, n)?;
                enc.copy_buffer_to_buffer(&self.ws.dpo_stats, 0, slot, at, (n * 4) as u64);
            } else {
                self.model.forward_backward(&mut enc, &self.ws, b, &self.adapter, &self.opt.grads, scale)?;
                self.opt.check_losses(&ctx, &mut enc, &self.ws.loss, b.len())?;
                enc.copy_buffer_to_buffer(&self.ws.loss, 0, slot, at, (b.len() * 4) as u64);
            }
            if k + 1 == group.len() {
                self.opt.record_step(&ctx, &mut enc, &self.adapter.params, lr)?;
                enc.copy_buffer_to_buffer(&self.opt.norm, 0, slot, 0, 4);
                enc.copy_buffer_to_buffer(&self.opt.applied, 0, slot, 4, 4);
                enc.copy_buffer_to_buffer(&self.opt.skip, 0, slot, 8, 4);
                return Ok(ctx.submit_and_map(enc, slot, slot.size()));
            }
            ctx.submit([enc.finish()]);
        }
        Err(Error::invalid("training step", "has no batches"))
    }

    /// Collects a step's readback (waiting only if the GPU has not finished it) and reports the
    /// step: its loss, or a warning when it was non-finite and skipped, or the error when too
    /// many in a row were. Returns the loss of a step that was applied.
    fn land(&mut self, f: InFlight, clock: &RunClock, on_event: &mut dyn FnMut(&Event)) -> Result<Option<f32>> {
        let ctx = self.model.ctx.clone();
        let words = ctx.finish_read(f.read)?;
        let stride = self.readback_stride();
        let (loss, rewards) = if self.dpo.is_some() {
            let mut stats = Vec::new();
            for (k, &pairs) in f.pairs.iter().enumerate() {
                let at = READBACK_HEADER + k * stride;
                stats.extend(words[at..at + DPO_STATS * pairs].iter().map(|&w| f32::from_bits(w)));
            }
            let (loss, rewards) = Rewards::of(&stats);
            (loss, Some(rewards))
        } else {
            let mut loss_sum = 0f64;
            for (k, &len) in f.lens.iter().enumerate() {
                let at = READBACK_HEADER + k * stride;
                loss_sum += words[at..at + len].iter().map(|&w| f64::from(f32::from_bits(w))).sum::<f64>();
            }
            ((loss_sum / f.scored.max(1) as f64) as f32, None)
        };
        let norm = f32::from_bits(words[0]);
        self.state.updates = words[1];
        // What the GPU decided: a finite norm and no loss flagged (the same as a finite mean loss).
        let applied = norm.is_finite() && words[2] == 0;
        if !applied {
            self.state.bad_steps += 1;
            let what = format!("loss {loss}, gradient norm {norm}");
            if self.state.bad_steps >= self.cfg.max_bad_steps {
                return Err(Error::Diverged {
                    step: f.step,
                    what: format!(
                        "{} consecutive steps had a non-finite loss or gradient (last: {what}); the last \
                         checkpoint was kept. Lower the learning rate or check the data",
                        self.state.bad_steps
                    ),
                });
            }
            on_event(&Event::Warning {
                step: f.step,
                message: format!("step skipped: non-finite {what}; the adapter was not updated"),
            });
            return Ok(None);
        }
        self.state.bad_steps = 0;
        self.state.window.0 += f64::from(loss);
        self.state.window.1 += 1;
        let elapsed = clock.started.elapsed().as_secs_f64();
        let done = (f.step - clock.start_step) as f64;
        on_event(&Event::Step {
            step: f.step,
            total_steps: clock.total,
            epoch: f.epoch,
            loss,
            lr: f.lr,
            grad_norm: norm,
            tokens: f.tokens,
            tokens_per_s: (f.tokens - clock.start_tokens) as f64 / elapsed.max(1e-9),
            eta_s: elapsed / done * (clock.total - f.step) as f64,
            gpu_memory_bytes: ctx.allocated_bytes().unwrap_or(clock.planned),
            rewards,
        });
        Ok(Some(loss))
    }
}

/// Words before the losses in a step's readback: the gradient norm, the update count, the
/// non-finite-loss flag, padding.
const READBACK_HEADER: usize = 4;

/// What a run's step events are measured against.
#[derive(Debug)]
struct RunClock {
    total: u64,
    start_step: u64,
    start_tokens: u64,
    started: Instant,
    planned: u64,
}

/// What a run keeps between its steps (see [`Trainer::step`]).
#[derive(Debug)]
struct Running {
    schedule: Schedule,
    clock: RunClock,
    /// The two readback buffers, used in turn.
    slots: [wgpu::Buffer; 2],
    in_flight: Option<InFlight>,
    last_checkpoint: Instant,
    /// The step of the last checkpoint this run wrote.
    saved_step: Option<u64>,
    /// This epoch's order of the training batches.
    order: Vec<usize>,
    last_loss: Option<f32>,
}

/// A step recorded and submitted whose readback has not been collected yet.
#[derive(Debug)]
struct InFlight {
    step: u64,
    epoch: f64,
    lr: f32,
    tokens: u64,
    /// Tokens of each micro-batch, in the order their losses sit in the readback.
    lens: Vec<usize>,
    /// DPO: the pairs of each micro-batch, whose statistics sit in the readback instead.
    pairs: Vec<usize>,
    scored: usize,
    read: PendingRead,
}

/// DPO's state in a trainer: the loss, and the reference's log-probabilities or the adapter
/// that computes them.
#[derive(Debug)]
struct Dpo {
    loss: DpoLoss,
    reference: DpoRef,
}

#[derive(Debug)]
enum DpoRef {
    /// Each batch's (chosen, rejected) log-probabilities per pair: every draw's training
    /// batches, and the validation batches.
    Precomputed { rounds: Vec<Vec<Vec<f32>>>, val: Vec<Vec<f32>> },
    /// The starting adapter, frozen, for a forward pass in every step.
    InStep(GpuAdapter),
}

impl DpoRef {
    /// The reference of training batch `i` of draw `round`, or of validation batch `i`.
    fn of(&self, round: Option<usize>, i: usize) -> Reference<'_> {
        match (self, round) {
            (DpoRef::InStep(a), _) => Reference::Adapter(a),
            (DpoRef::Precomputed { rounds, .. }, Some(r)) => Reference::Given(&rounds[r][i]),
            (DpoRef::Precomputed { val, .. }, None) => Reference::Given(&val[i]),
        }
    }
}

/// The (chosen, rejected) log-probabilities of each pair of `b` under `adapter`.
fn reference_logps(model: &Model, ws: &Workspace, b: &Batch, adapter: &GpuAdapter) -> Result<Vec<f32>> {
    let mut enc = model.ctx.encoder_with(ws.binds());
    model.pair_logps(&mut enc, ws, b, adapter)?;
    model.ctx.submit([enc.finish()]);
    model.ctx.read_f32(&ws.dpo_reference, 2 * b.pairs.len())
}
