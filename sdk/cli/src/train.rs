//! `edgetune train` and `edgetune export`: settings from a TOML file and flags, a progress bar on
//! a terminal or JSON lines with `--json`, and the output folder:
//!
//! ```text
//! OUTPUT/adapter/                 the PEFT adapter (the final one, or the best by a meaningful
//!                                 validation loss: see keep_best)
//! OUTPUT/checkpoint.safetensors   adapter, optimizer, schedule, RNG and data cursor
//! OUTPUT/train_config.toml        the settings the run used, the automatic choices filled in
//! ```
//!
//! Settings left unset are chosen from the data (`edgetune::train::auto`); the run prints each
//! choice at its start.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgetune::data::{self, Format, TrainOn};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::infer::GenerateOptions;
use edgetune::lora::{Layout, TargetModules, peft};
use edgetune::model::llama::{LoadOptions, Model};
use edgetune::tokenizer::Tokenizer;
use edgetune::train::checkpoint::Checkpoint;
use edgetune::train::schedule::ScheduleKind;
use edgetune::train::{AnswerEval, Event, Precision, StopReason, TrainConfig, Trainer};
use edgetune::{Error, Result};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

#[derive(clap::Args)]
pub struct TrainArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Training data: a JSON/JSONL file (Alpaca, ShareGPT, OpenAI chat; preference pairs for
    /// --method dpo), a text file or a folder.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// sft (supervised, the default) or dpo (preference pairs: prompt, chosen, rejected).
    #[arg(long)]
    pub(crate) method: Option<edgetune::train::Method>,
    /// DPO: how far the policy may move from the reference (default 0.1; higher stays closer).
    #[arg(long)]
    pub(crate) beta: Option<f32>,
    /// DPO: sigmoid (default), robust or ipo.
    #[arg(long)]
    pub(crate) dpo_loss: Option<edgetune::train::DpoLossKind>,
    /// DPO: the probability that a preference is flipped, in [0, 0.5): conservative DPO with the
    /// sigmoid loss, robust DPO with --dpo-loss robust.
    #[arg(long)]
    pub(crate) label_smoothing: Option<f32>,
    /// DPO: precomputed (the reference's log-probabilities once, before training; the default)
    /// or in_step (a frozen copy of the starting adapter, run in every step).
    #[arg(long)]
    pub(crate) dpo_reference: Option<edgetune::train::DpoReference>,
    /// Output folder (adapter, checkpoint, settings).
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// A TOML file of settings (the TrainConfig fields; flags override it).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Continue from OUTPUT/checkpoint.safetensors.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Start from this adapter (a PEFT folder or a GGUF LoRA file, such as one from llama.cpp)
    /// instead of a fresh one: its rank, alpha and modules are the run's.
    #[arg(long, conflicts_with_all = ["rank", "alpha", "target_modules"])]
    pub(crate) init_adapter: Option<PathBuf>,
    /// Print one JSON event per line on stdout instead of the progress bar.
    #[arg(long)]
    pub(crate) json: bool,
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    #[arg(long)]
    pub(crate) max_steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// constant, linear or cosine.
    #[arg(long)]
    pub(crate) schedule: Option<ScheduleKind>,
    #[arg(long)]
    pub(crate) warmup_steps: Option<u64>,
    /// LoRA rank.
    #[arg(long)]
    pub(crate) rank: Option<usize>,
    #[arg(long)]
    pub(crate) alpha: Option<f32>,
    /// Comma-separated module names (q_proj,v_proj) or all-linear.
    #[arg(long)]
    pub(crate) target_modules: Option<String>,
    #[arg(long)]
    pub(crate) rslora: bool,
    #[arg(long)]
    pub(crate) batch_tokens: Option<usize>,
    #[arg(long)]
    pub(crate) grad_accum: Option<usize>,
    /// Longest sample in tokens.
    #[arg(long)]
    pub(crate) max_len: Option<usize>,
    /// auto, alpaca, sharegpt, openai or text.
    #[arg(long)]
    pub(crate) format: Option<Format>,
    /// Train on every token instead of assistant turns only.
    #[arg(long)]
    pub(crate) train_on_all: bool,
    /// Share of the samples held out at random for validation (unset: automatic, see the README).
    #[arg(long)]
    pub(crate) val_fraction: Option<f32>,
    /// Your own held-out records (a file or folder like --data) to validate on; all of --data is
    /// then trained.
    #[arg(long)]
    pub(crate) val_data: Option<PathBuf>,
    /// Held-out conversations (or preference pairs, the chosen answer as the reference) to answer
    /// at each evaluation, scored as `eval --generate` scores them (exact match, token F1,
    /// ROUGE-L), base against adapter. Needs validation samples (--val-data).
    #[arg(long)]
    pub(crate) score_answers: Option<PathBuf>,
    /// With --score-answers: the most tokens of each answer.
    #[arg(long, default_value_t = 64, requires = "score_answers")]
    pub(crate) score_max_tokens: usize,
    /// Records chained into one training conversation, a fresh draw each epoch (1: each record
    /// alone; unset: automatic, see the README).
    #[arg(long)]
    pub(crate) chain: Option<usize>,
    /// Return the adapter with the best validation loss (true) or the final one (false).
    /// Unset: true only when the validation loss is meaningful.
    #[arg(long)]
    pub(crate) keep_best: Option<bool>,
    #[arg(long)]
    pub(crate) eval_every: Option<u64>,
    #[arg(long)]
    pub(crate) patience: Option<u32>,
    #[arg(long)]
    pub(crate) checkpoint_every: Option<u64>,
    /// Also checkpoint once this many seconds have passed since the last checkpoint (default
    /// 600; 0: not by time).
    #[arg(long)]
    pub(crate) checkpoint_every_s: Option<u64>,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Skip bad records (and report how many) instead of stopping at the first.
    #[arg(long)]
    pub(crate) skip_bad_records: bool,
    /// System message for conversations without one (generate with the same --system).
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Keep every layer's activations instead of recomputing them (faster, more memory).
    #[arg(long)]
    pub(crate) no_gradient_checkpointing: bool,
    /// Storage of the activations kept for the backward pass: f32, or f16 (half the
    /// activation memory; arithmetic, LoRA weights and optimizer state stay f32).
    #[arg(long)]
    pub(crate) activations: Option<Precision>,
    /// KV-cache and sample length limit of the loaded model.
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_context: usize,
    /// How the base's linear weights are held on the GPU: gguf (a GGUF file's quantized tensors
    /// keep their own values, NF4 for its other weights and for a Hugging Face folder), nf4 (NF4
    /// throughout) or none (f32).
    #[arg(long, default_value = "gguf")]
    pub(crate) quant: edgetune::model::llama::Quant,
}

pub(crate) fn resolve(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(path) => {
            let text = edgetune::files::read_config(path)?;
            toml::from_str::<TrainConfig>(&text)
                .map_err(|e| Error::Format { path: path.clone(), what: format!("invalid settings: {e}") })?
        }
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($flag:expr => $($field:tt)+) => {
            if let Some(v) = $flag.clone() {
                c.$($field)+ = v;
            }
        };
    }
    macro_rules! set_some {
        ($flag:expr => $($field:tt)+) => {
            if let Some(v) = $flag.clone() {
                c.$($field)+ = Some(v);
            }
        };
    }
    set!(a.method => method);
    set!(a.beta => dpo.beta);
    set!(a.dpo_loss => dpo.loss);
    set!(a.label_smoothing => dpo.label_smoothing);
    set_some!(a.dpo_reference => dpo.reference);
    set_some!(a.epochs => epochs);
    set_some!(a.max_steps => max_steps);
    set_some!(a.lr => learning_rate);
    set!(a.schedule => lr_schedule);
    set_some!(a.warmup_steps => warmup_steps);
    set!(a.rank => lora.r);
    set!(a.alpha => lora.alpha);
    set_some!(a.batch_tokens => batch_tokens);
    set!(a.grad_accum => grad_accum);
    set!(a.max_len => data.max_len);
    set!(a.format => data.format);
    set_some!(a.val_fraction => data.val_fraction);
    set_some!(a.val_data => data.val_data);
    set_some!(a.chain => data.chain);
    set_some!(a.keep_best => keep_best);
    set!(a.eval_every => eval_every);
    set!(a.patience => early_stopping_patience);
    set!(a.checkpoint_every => checkpoint_every);
    set!(a.checkpoint_every_s => checkpoint_every_s);
    set!(a.activations => activations);
    if let Some(system) = &a.system {
        c.data.system = Some(system.clone());
    }
    if let Some(seed) = a.seed {
        c.seed = seed;
        c.data.seed = seed;
        c.lora.seed = seed;
    }
    if let Some(t) = &a.target_modules {
        c.lora.target_modules = if t == "all-linear" {
            TargetModules::Preset(t.clone())
        } else {
            TargetModules::Names(t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        };
    }
    c.lora.use_rslora |= a.rslora;
    if a.train_on_all {
        c.data.train_on = TrainOn::All;
    }
    c.data.skip_bad_records |= a.skip_bad_records;
    c.gradient_checkpointing &= !a.no_gradient_checkpointing;
    c.validate()?;
    Ok(c)
}

pub fn human_time(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s % 3600 / 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

/// Draws the progress bar (on a terminal) or prints events as lines.
struct Reporter {
    json: bool,
    tty: bool,
}

impl Reporter {
    fn event(&self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            return;
        }
        let mut err = std::io::stderr().lock();
        match e {
            Event::Started {
                total_steps,
                start_step,
                train_samples,
                val_samples,
                trainable_parameters,
                chosen,
                ..
            } => {
                if !chosen.is_empty() {
                    let _ = writeln!(err, "chosen from the data (set any of them to override):");
                    for c in chosen {
                        let _ = writeln!(err, "  {c}");
                    }
                }
                let _ = writeln!(
                    err,
                    "training {trainable_parameters} LoRA parameters on {train_samples} samples ({val_samples} for \
                     validation), steps {start_step}..{total_steps}"
                );
            }
            Event::Step { step, total_steps, epoch, loss, lr, grad_norm, tokens_per_s, eta_s, rewards, .. } => {
                let width = 24;
                let filled = (*step as usize * width / (*total_steps).max(1) as usize).min(width);
                let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled));
                let margin = rewards.map(|r| format!(" margin {:.3} acc {:.2}", r.margins, r.accuracies));
                let line = format!(
                    "{bar} step {step}/{total_steps} epoch {epoch:.2} loss {loss:.4}{} lr {lr:.2e} grad \
                     {grad_norm:.3} {tokens_per_s:.1} tok/s ETA {}",
                    margin.unwrap_or_default(),
                    human_time(*eta_s)
                );
                if self.tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
            }
            Event::Eval { step, val_loss, perplexity, improved, rewards, answers, .. } => {
                let mark = if *improved { " (best)" } else { "" };
                let nl = if self.tty { "\n" } else { "" };
                let what = match rewards {
                    Some(r) => format!(
                        "val DPO loss {val_loss:.4}, rewards chosen {:.3} rejected {:.3} margin {:.3}, accuracy {:.2}",
                        r.chosen, r.rejected, r.margins, r.accuracies
                    ),
                    None => format!("val loss {val_loss:.4}, perplexity {perplexity:.2}"),
                };
                let _ = writeln!(err, "{nl}eval at step {step}: {what}{mark}");
                if let Some(a) = answers {
                    let _ = writeln!(
                        err,
                        "  answers (base -> adapter): exact {:.3} -> {:.3}, F1 {:.3} -> {:.3}, ROUGE-L {:.3} -> {:.3}",
                        a.base.exact, a.adapter.exact, a.base.f1, a.adapter.f1, a.base.rouge_l, a.adapter.rouge_l
                    );
                }
            }
            Event::Warning { step, message } => {
                let _ = writeln!(err, "\nwarning at step {step}: {message}");
            }
            Event::Checkpoint { .. } => {}
            Event::Finished { step, reason, best_val_loss } => {
                let nl = if self.tty { "\n" } else { "" };
                let best = best_val_loss.map(|l| format!(", best val loss {l:.4}")).unwrap_or_default();
                let _ = writeln!(err, "{nl}finished at step {step}: {reason:?}{best}");
            }
        }
    }
}

/// Trains; false when Ctrl-C stopped the run (the checkpoint and the adapter so far are saved).
pub fn run(a: TrainArgs, gpu: &GpuOptions) -> Result<bool> {
    let cfg = resolve(&a)?;
    let cancel = edgetune::train::CancelToken::default();
    crate::interrupt::cancel_on_interrupt(cancel.clone());
    let reporter = Reporter { json: a.json, tty: std::io::stderr().is_terminal() };
    let ctx = Arc::new(GpuContext::new(gpu)?);
    let tok = Arc::new(Tokenizer::open(&a.model)?);
    let dataset = data::load(&a.data, &tok, &cfg.data)?;
    // The held-out answers to score at each evaluation, read before the model loads.
    let answer_eval = match &a.score_answers {
        Some(path) => {
            let mut read = 0;
            let (records, bad) = data::formats::read(path, Format::Auto, &mut read)?;
            data::formats::refuse_bad(&bad)?;
            let exchanges = data::exchanges(&records, cfg.data.system.as_deref())?;
            let opts = GenerateOptions { max_new_tokens: a.score_max_tokens, ..GenerateOptions::default() };
            Some(AnswerEval { tokenizer: tok.clone(), exchanges, opts })
        }
        None => None,
    };
    let r = &dataset.report;
    if !a.json {
        eprintln!(
            "data: {} records, {} bad, {} duplicates, {} too short, {} truncated, {} dropped too long -> {} train / {} \
             validation samples",
            r.records,
            r.bad_records,
            r.duplicates,
            r.too_short,
            r.truncated,
            r.dropped_too_long,
            r.train_samples,
            r.val_samples
        );
    }
    let load = LoadOptions { max_context: a.max_context, quant: a.quant, ..Default::default() };
    let model = Arc::new(Model::open(ctx, &a.model, &load)?);
    std::fs::create_dir_all(&a.output).map_err(|e| Error::Io { path: a.output.clone(), source: e })?;
    let mut trainer = match &a.init_adapter {
        Some(path) => {
            let start = edgetune::lora::load(path, &model.config)?;
            if !a.json {
                eprintln!("starting from {} (r = {}, alpha = {})", path.display(), start.config.r, start.config.alpha);
            }
            Trainer::with_adapter(model.clone(), &dataset, cfg, start)?
        }
        None => Trainer::new(model.clone(), &dataset, cfg)?,
    };
    edgetune::atomic::write_atomic(
        &a.output.join("train_config.toml"),
        settings_toml(trainer.config(), trainer.chosen())?.as_bytes(),
    )?;
    if let Some(eval) = answer_eval {
        trainer.score_answers_at_evals(eval)?;
    }
    trainer.set_cancel_token(cancel);
    let ckpt = a.output.join(CHECKPOINT_FILE);
    if a.resume {
        trainer.resume(&ckpt)?;
    }
    trainer.set_checkpoint_path(&ckpt);
    let out = trainer.run(|e| reporter.event(e))?;
    let dir = a.output.join("adapter");
    peft::save(&dir, &out.adapter, &base_name(&a.model))?;
    let cancelled = out.reason == StopReason::Cancelled;
    if !a.json {
        let what = if cancelled { "interrupted; adapter so far" } else { "adapter" };
        eprintln!("{what} saved to {} (checkpoint {})", dir.display(), ckpt.display());
        if cancelled {
            eprintln!("continue with the same command and --resume");
        }
    }
    Ok(!cancelled)
}

/// The run's settings as a TOML file (every automatic choice filled in, so the file repeats the
/// run), with the automatic choices and their reasons in comments at its top.
pub fn settings_toml(config: &TrainConfig, chosen: &[edgetune::train::Choice]) -> Result<String> {
    let body = toml::to_string(config)
        .map_err(|e| Error::Invalid { field: "settings".into(), what: format!("writing TOML: {e}") })?;
    let mut out = String::from("# The settings of this run.");
    if !chosen.is_empty() {
        out.push_str(" Chosen from the data (the others were given):\n");
        for c in chosen {
            out.push_str(&format!("#   {c}\n"));
        }
    }
    out.push_str("\n\n");
    out.push_str(&body);
    Ok(out)
}

pub fn base_name(model: &Path) -> String {
    model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What `edgetune export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A PEFT adapter folder (adapter_model.safetensors + adapter_config.json).
    Peft,
    /// A GGUF LoRA adapter file for llama.cpp, Ollama and LM Studio.
    Gguf,
}

/// Tensor type of a GGUF file (adapters take f32, f16, bf16 and q8_0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl GgufType {
    pub fn ggml(self) -> edgetune::quant::gguf_blocks::GgmlType {
        use edgetune::quant::gguf_blocks::GgmlType;
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Bf16 => GgmlType::Bf16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4_0 => GgmlType::Q4_0,
            GgufType::Q4K => GgmlType::Q4K,
        }
    }
}

/// Arguments of `edgetune export`.
#[derive(Debug)]
pub struct ExportArgs<'a> {
    pub model: &'a Path,
    /// A training checkpoint, or else an adapter (PEFT folder or GGUF file).
    pub checkpoint: Option<&'a Path>,
    pub adapter: Option<&'a Path>,
    pub output: &'a Path,
    pub last: bool,
    pub format: ExportFormat,
    pub ty: GgufType,
}

pub fn export(a: &ExportArgs<'_>) -> Result<()> {
    let (cfg, _) = edgetune::model::open_weights(a.model)?;
    let adapter = match (a.checkpoint, a.adapter) {
        (Some(ck), None) => checkpoint_adapter(&cfg, ck, a.last)?,
        (None, Some(dir)) => edgetune::lora::load(dir, &cfg)?,
        _ => {
            return Err(Error::Invalid {
                field: "export".into(),
                what: "give exactly one of --checkpoint and --adapter".into(),
            });
        }
    };
    match a.format {
        ExportFormat::Peft => peft::save(a.output, &adapter, &base_name(a.model))?,
        ExportFormat::Gguf => {
            let ty = a.ty.ggml();
            let saved = edgetune::lora::gguf::save(a.output, &adapter, &cfg, ty)?;
            if saved.fell_back_to_f16 > 0 {
                eprintln!(
                    "{} of {} tensors written as F16: their rows (r = {} values) are no whole number of {} blocks",
                    saved.fell_back_to_f16,
                    saved.tensors,
                    adapter.layout.r,
                    ty.name()
                );
            }
        }
    }
    eprintln!("wrote {}", a.output.display());
    if a.format == ExportFormat::Gguf {
        write_modelfile(a.output, &edgetune::lora::gguf::modelfile(a.model, Some(a.output)))?;
    }
    Ok(())
}

/// Writes an Ollama Modelfile beside `output` (`Modelfile`, or `NAME.Modelfile` when a
/// Modelfile that edgetune did not write is already there).
pub fn write_modelfile(output: &Path, text: &str) -> Result<()> {
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut path = dir.join("Modelfile");
    let ours = |p: &Path| std::fs::read_to_string(p).map(|t| t.starts_with("# Written by edgetune")).unwrap_or(true);
    if path.exists() && !ours(&path) {
        let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        path = dir.join(format!("{stem}.Modelfile"));
    }
    edgetune::atomic::write_atomic(&path, text.as_bytes())?;
    eprintln!("wrote {} (for `ollama create NAME -f {}`)", path.display(), path.display());
    Ok(())
}

fn checkpoint_adapter(
    cfg: &edgetune::model::config::ModelConfig,
    checkpoint: &Path,
    last: bool,
) -> Result<edgetune::lora::Adapter> {
    let ck = Checkpoint::load(checkpoint)?;
    let layout = Layout::new(cfg, &ck.lora)?;
    if layout.len != ck.params.len() {
        return Err(Error::Format {
            path: checkpoint.to_path_buf(),
            what: format!(
                "holds {} adapter values but this model's layout needs {}: checkpoint from another model",
                ck.params.len(),
                layout.len
            ),
        });
    }
    let params = match (&ck.best, last) {
        (Some(best), false) => best.clone(),
        _ => ck.params,
    };
    Ok(edgetune::lora::Adapter { config: ck.lora, layout, params })
}
