//! `edgetune export-job`: the training job `edgetune train` would run with the same arguments,
//! written as a folder for a PyTorch trainer that scales across NVIDIA GPUs (TRL's SFTTrainer,
//! launched by accelerate, on one GPU, several or DeepSpeed ZeRO-2):
//!
//! ```text
//! OUTPUT/job.json                 every setting the script reads
//! OUTPUT/train.py                 the TRL script (SFTTrainer, PEFT, bitsandbytes NF4)
//! OUTPUT/run.sh                   bash run.sh [single|multi|deepspeed|f32]
//! OUTPUT/accelerate/*.yaml        one GPU, N GPUs, DeepSpeed ZeRO-2 on N GPUs
//! OUTPUT/requirements.txt         the versions the export was checked against
//! OUTPUT/data/train.jsonl         one row a micro-batch, in training order (see below)
//! OUTPUT/data/validation.jsonl    the validation batches, when the run validates
//! OUTPUT/init_adapter/            the adapter training starts from (PEFT)
//! OUTPUT/base/                    a GGUF base converted to a Hugging Face folder (f32)
//! OUTPUT/train_config.toml        edgetune's resolved settings (`train --config` repeats them)
//! OUTPUT/README.md                what each setting became, and what could not carry over
//! ```
//!
//! The data is pre-tokenized: TRL cannot reproduce edgetune's assistant-only mask from its own
//! options for chat templates without generation markers, nor its packing, chaining and order.
//! Each row holds `input_ids`, `labels` (-100 where nothing is trained) and `seq_lengths` (the
//! packed samples' lengths: TRL's padding-free collator restarts the positions at each, so
//! samples never attend to each other), plus `sources` (each sample's file and record lines: several
//! for a conversation of chained records).

use std::path::{Path, PathBuf};

use edgetune::data::{self, Sample};
use edgetune::lora::{Adapter, TargetModules, merge, peft};
use edgetune::model::llama::Quant;
use edgetune::tokenizer::Tokenizer;
use edgetune::train::schedule::ScheduleKind;
use edgetune::train::{Method, ModelLimits, RunPlan};
use edgetune::{Error, Result};
use serde_json::json;

use crate::train::{TrainArgs, base_name, resolve, settings_toml};

const TRL_SCRIPT: &str = include_str!("../assets/trl/train.py");
const LF_PREPARE: &str = include_str!("../assets/llamafactory/prepare_data.py");

/// The LLaMA-Factory version the exported job is tested against.
const LF_REQUIREMENTS: &str = "\
# The version `edgetune export-job` was checked against.
llamafactory==0.9.5
bitsandbytes
# For deepspeed in job.yaml:
# deepspeed
";

/// The versions the exported job is tested against.
const REQUIREMENTS: &str = "\
# The versions `edgetune export-job` was checked against (newer ones usually work).
trl==1.16.0
transformers==5.24.0
peft==0.21.2
datasets
accelerate
bitsandbytes
# For bash run.sh deepspeed:
# deepspeed
";

/// The trainers a job can be exported to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Hugging Face TRL's SFTTrainer (with PEFT, bitsandbytes, accelerate or DeepSpeed).
    Trl,
    /// LLaMA-Factory (`llamafactory-cli train`, torchrun or DeepSpeed for several GPUs).
    Llamafactory,
}

#[derive(clap::Args)]
pub struct ExportJobArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// The trainer to write the job for: trl or llamafactory.
    #[arg(long, value_enum)]
    pub to: Target,
    /// GPUs the job will run on: each optimizer step's samples are spread over them (and over
    /// gradient accumulation), so the steps stay edgetune's.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
}

fn invalid(field: &str, what: impl Into<String>) -> Error {
    Error::Invalid { field: field.into(), what: what.into() }
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// One row of the exported data: a packed micro-batch.
struct Row {
    ids: Vec<u32>,
    labels: Vec<i64>,
    seq_lengths: Vec<usize>,
    sources: Vec<String>,
}

impl Row {
    fn of(samples: &[&Sample], filler: u32) -> Row {
        if samples.is_empty() {
            // An optimizer step with fewer micro-batches than the accumulation: one token,
            // nothing trained (no loss, no gradient, not counted in the step's mean).
            return Row { ids: vec![filler], labels: vec![-100], seq_lengths: vec![1], sources: vec![] };
        }
        let mut r = Row { ids: vec![], labels: vec![], seq_lengths: vec![], sources: vec![] };
        for s in samples {
            r.ids.extend(&s.ids);
            // train[i]: token i is predicted from those before it (the first never is).
            r.labels.extend(s.ids.iter().zip(&s.train).enumerate().map(
                |(i, (&id, &t))| {
                    if t && i > 0 { i64::from(id) } else { -100 }
                },
            ));
            r.seq_lengths.push(s.ids.len());
            let lines: Vec<String> =
                std::iter::once(s.line).chain(s.chained_lines.iter().copied()).map(|l| l.to_string()).collect();
            r.sources.push(format!("{}:{}", s.file.display(), lines.join(",")));
        }
        r
    }

    fn json(&self) -> serde_json::Value {
        json!({"input_ids": self.ids, "labels": self.labels, "seq_lengths": self.seq_lengths, "sources": self.sources})
    }
}

/// Spreads one step's samples (in order) over `n` rows, each to the row with the fewest tokens
/// so far.
fn spread<'a>(samples: &[&'a Sample], n: usize) -> Vec<Vec<&'a Sample>> {
    let mut rows: Vec<Vec<&Sample>> = vec![Vec::new(); n];
    let mut tokens = vec![0usize; n];
    for s in samples {
        let k = (0..n).min_by_key(|&k| (tokens[k], k)).unwrap_or(0);
        tokens[k] += s.ids.len();
        rows[k].push(s);
    }
    rows
}

/// Writes rows as JSON lines.
fn write_rows(path: &Path, rows: &[Row]) -> Result<()> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, &r.json()).map_err(|e| invalid("export", e.to_string()))?;
        out.push(b'\n');
    }
    write(path, &out)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| io(path, e))
}

/// An f32 setting as the decimal it was written as (0.9, not 0.8999999761581421).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn scheduler(kind: ScheduleKind) -> &'static str {
    match kind {
        ScheduleKind::Constant => "constant_with_warmup",
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
    }
}

/// Exports the job; returns the folder written.
pub fn run(a: ExportJobArgs) -> Result<PathBuf> {
    let t = &a.train;
    if t.resume || t.score_answers.is_some() {
        return Err(invalid(
            "export-job",
            "--resume and --score-answers apply to `edgetune train`, not to an exported job",
        ));
    }
    if a.gpus == 0 {
        return Err(invalid("gpus", "must be at least 1"));
    }
    let mut cfg = resolve(t)?;
    if cfg.method == Method::Dpo {
        return Err(invalid(
            "method",
            "export-job writes supervised (sft) jobs; DPO jobs are trained with `edgetune train --method dpo`",
        ));
    }
    let out = &t.output;
    if out.exists() && std::fs::read_dir(out).map_err(|e| io(out, e))?.next().is_some() {
        return Err(invalid(
            "output",
            format!("{} exists and is not empty: give a new folder for the job", out.display()),
        ));
    }
    let (model_cfg, _) = edgetune::model::open_weights(&t.model)?;
    if model_cfg.multimodal {
        // The trainers' `all-linear` and named targets would also adapt the vision tower.
        return Err(invalid(
            "model",
            format!(
                "{} is a multimodal model (its text model is trained here); export-job writes jobs for text-only \
                 models",
                t.model.display()
            ),
        ));
    }
    let tok = Tokenizer::open(&t.model)?;
    let dataset = data::load(&t.data, &tok, &cfg.data)?;
    let adapter = match &t.init_adapter {
        Some(path) => edgetune::lora::load(path, &model_cfg)?,
        None => Adapter::new(&model_cfg, cfg.lora.clone())?,
    };
    cfg.lora = adapter.config.clone();
    let plan = RunPlan::new(&dataset, cfg, ModelLimits::context(model_cfg.usable_context(t.max_context)))?;
    let cfg = &plan.config;

    // Everything is written to a sibling folder first and renamed at the end, so a failure
    // leaves no half-written job.
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "job".into());
    let part = out.with_file_name(format!(".{name}.part"));
    if part.exists() {
        std::fs::remove_dir_all(&part).map_err(|e| io(&part, e))?;
    }
    let written = write_job(&a, &plan, &adapter, &part);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&part);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| io(out, e))?;
    }
    std::fs::rename(&part, out).map_err(|e| io(out, e))?;
    let steps = plan.total_steps();
    eprintln!(
        "wrote {}: {} training samples in {steps} steps of up to {} tokens ({} rows a step over {} GPU{}), \
         learning rate {:e}",
        out.display(),
        dataset.train.len(),
        cfg.batch_tokens.unwrap_or_default() * cfg.grad_accum,
        rows_per_step(cfg.grad_accum, a.gpus),
        a.gpus,
        if a.gpus == 1 { "" } else { "s" },
        plan.learning_rate(),
    );
    eprintln!("run it with: bash {}/run.sh (see its README.md)", out.display());
    Ok(out.clone())
}

/// Accumulation steps on each GPU so that `gpus` of them take at least `grad_accum` rows a step.
fn accumulation(grad_accum: usize, gpus: usize) -> usize {
    grad_accum.div_ceil(gpus)
}

fn rows_per_step(grad_accum: usize, gpus: usize) -> usize {
    gpus * accumulation(grad_accum, gpus)
}

fn write_job(a: &ExportJobArgs, plan: &RunPlan, adapter: &Adapter, dir: &Path) -> Result<()> {
    let t = &a.train;
    let cfg = &plan.config;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let per_step = rows_per_step(cfg.grad_accum, a.gpus);
    let filler = plan.rounds[0].samples.first().and_then(|s| s.ids.first().copied()).unwrap_or(0);

    // The training rows: each step's batches as edgetune sums them; on several GPUs, the step's
    // samples spread over gpus x accumulation rows.
    let mut rows = Vec::new();
    for step in plan.steps() {
        let round = &plan.rounds[step.round];
        let groups: Vec<Vec<&Sample>> = if a.gpus == 1 {
            let mut g: Vec<Vec<&Sample>> = step.batches.iter().map(|&b| round.batch(b).collect()).collect();
            g.resize_with(per_step, Vec::new);
            g
        } else {
            let all: Vec<&Sample> = step.batches.iter().flat_map(|&b| round.batch(b)).collect();
            spread(&all, per_step)
        };
        rows.extend(groups.iter().map(|g| Row::of(g, filler)));
    }
    write_rows(&dir.join("data/train.jsonl"), &rows)?;
    let val: Vec<Row> =
        (0..plan.val.batches.len()).map(|b| Row::of(&plan.val.batch(b).collect::<Vec<_>>(), filler)).collect();
    if !val.is_empty() {
        write_rows(&dir.join("data/validation.jsonl"), &val)?;
    }

    peft::save(&dir.join("init_adapter"), adapter, &base_name(&t.model))?;
    let from_gguf = !t.model.is_dir();
    let base_path = if from_gguf {
        merge::convert(&t.model, &dir.join("base"), merge::MergeDtype::F32)?;
        "base".to_string()
    } else {
        let abs = std::fs::canonicalize(&t.model).map_err(|e| io(&t.model, e))?;
        abs.to_string_lossy().into_owned()
    };
    let targets = match &cfg.lora.target_modules {
        TargetModules::Preset(p) => json!(p),
        TargetModules::Names(n) => json!(n),
    };
    let o = &cfg.optimizer;
    let eval_steps = if cfg.eval_every > 0 { cfg.eval_every } else { plan.steps_per_epoch() };
    let job = json!({
        "written_by": format!("edgetune {}", env!("CARGO_PKG_VERSION")),
        "target": match a.to { Target::Trl => "trl", Target::Llamafactory => "llamafactory" },
        "base": {
            "path": base_path,
            "source": t.model.to_string_lossy(),
            "nf4": t.quant != Quant::None,
            "nf4_block_size": 64,
            "double_quant": false,
        },
        "init_adapter": "init_adapter",
        "lora": {
            "r": cfg.lora.r,
            "alpha": decimal(cfg.lora.alpha),
            "dropout": decimal(cfg.lora.dropout),
            "target_modules": targets,
            "use_rslora": cfg.lora.use_rslora,
        },
        "data": {
            "train": "data/train.jsonl",
            "validation": if val.is_empty() { None } else { Some("data/validation.jsonl") },
            "train_samples": plan.rounds[0].samples.len(),
            "validation_samples": plan.val.samples.len(),
            "rows": rows.len(),
            "rows_per_step": per_step,
        },
        "gpus": a.gpus,
        "training": {
            "max_steps": plan.total_steps(),
            "learning_rate": decimal(plan.learning_rate()),
            "lr_scheduler_type": scheduler(cfg.lr_schedule),
            "warmup_steps": plan.warmup_steps(),
            "weight_decay": decimal(o.weight_decay),
            "adam_beta1": decimal(o.beta1),
            "adam_beta2": decimal(o.beta2),
            "adam_epsilon": decimal(o.eps),
            "max_grad_norm": decimal(o.max_grad_norm),
            "seed": cfg.seed,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "eval_steps": eval_steps,
            "keep_best": plan.keep_best(),
            "early_stopping_patience": cfg.early_stopping_patience,
        },
    });
    let text = serde_json::to_string_pretty(&job).map_err(|e| invalid("export", e.to_string()))?;
    write(&dir.join("job.json"), text.as_bytes())?;
    write(&dir.join("train_config.toml"), settings_toml(cfg, &plan.chosen)?.as_bytes())?;
    match a.to {
        Target::Trl => {
            write(&dir.join("train.py"), TRL_SCRIPT.as_bytes())?;
            write(&dir.join("requirements.txt"), REQUIREMENTS.as_bytes())?;
            write(&dir.join("run.sh"), run_sh().as_bytes())?;
            write(&dir.join("accelerate/single_gpu.yaml"), accelerate_yaml("'NO'", 1, false).as_bytes())?;
            write(&dir.join("accelerate/multi_gpu.yaml"), accelerate_yaml("MULTI_GPU", a.gpus, false).as_bytes())?;
            write(&dir.join("accelerate/deepspeed_zero2.yaml"), accelerate_yaml("DEEPSPEED", a.gpus, true).as_bytes())?;
            write(&dir.join("README.md"), readme(a, plan, rows.len(), per_step, from_gguf).as_bytes())?;
        }
        Target::Llamafactory => {
            write(&dir.join("prepare_data.py"), LF_PREPARE.as_bytes())?;
            write(&dir.join("requirements.txt"), LF_REQUIREMENTS.as_bytes())?;
            write(&dir.join("job.yaml"), lf_yaml(a, plan, &job, per_step).as_bytes())?;
            write(&dir.join("deepspeed_zero2.json"), DEEPSPEED_ZERO2.as_bytes())?;
            // The parser wants a dataset name for training; with `tokenized_path` LLaMA-Factory
            // loads tokenized/ and reads nothing else.
            let mut info =
                json!({"edgetune_rows": {"file_name": "data/train.jsonl", "columns": {"prompt": "input_ids"}}});
            if !val.is_empty() {
                info["edgetune_validation"] =
                    json!({"file_name": "data/validation.jsonl", "columns": {"prompt": "input_ids"}});
            }
            let text = serde_json::to_string_pretty(&info).map_err(|e| invalid("export", e.to_string()))?;
            write(&dir.join("dataset_info.json"), text.as_bytes())?;
            write(&dir.join("run.sh"), lf_run_sh(a.gpus).as_bytes())?;
            write(&dir.join("README.md"), lf_readme(a, plan, rows.len(), per_step, from_gguf).as_bytes())?;
        }
    }
    Ok(())
}

/// DeepSpeed ZeRO-2 for LLaMA-Factory (`deepspeed: deepspeed_zero2.json` in job.yaml).
const DEEPSPEED_ZERO2: &str = r#"{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "zero_allow_untested_optimizer": true,
  "bf16": {"enabled": "auto"},
  "zero_optimization": {"stage": 2, "overlap_comm": false, "contiguous_gradients": true}
}
"#;

/// LLaMA-Factory's settings for the job (`llamafactory-cli train job.yaml`).
fn lf_yaml(a: &ExportJobArgs, plan: &RunPlan, job: &serde_json::Value, per_step: usize) -> String {
    let cfg = &plan.config;
    let t = &job["training"];
    let nf4 = a.train.quant != Quant::None;
    let quant = if nf4 { "quantization_bit: 4\nquantization_method: bnb\ndouble_quantization: false\n" } else { "" };
    let eval = if plan.val.batches.is_empty() {
        "eval_strategy: \"no\"\n".to_string()
    } else {
        let steps = &t["eval_steps"];
        let best = if plan.keep_best() {
            format!(
                "save_strategy: steps\nsave_steps: {steps}\nload_best_model_at_end: true\nmetric_for_best_model: eval_loss\n"
            )
        } else {
            "save_strategy: \"no\"\n".to_string()
        };
        format!(
            "eval_strategy: steps\neval_steps: {steps}\neval_dataset: edgetune_validation\nper_device_eval_batch_size: \
             1\n{best}"
        )
    };
    let sched = scheduler(cfg.lr_schedule);
    format!(
        "# llamafactory-cli train job.yaml (written by edgetune export-job; see README.md)\n\
         ### model\n\
         model_name_or_path: {base}\n\
         adapter_name_or_path: init_adapter\n\
         {quant}\
         ### method\n\
         stage: sft\n\
         do_train: true\n\
         finetuning_type: lora\n\
         lora_rank: {r}\n\
         lora_alpha: {alpha}\n\
         lora_dropout: {dropout}\n\
         lora_target: all\n\
         use_rslora: {rslora}\n\
         ### dataset: the rows edgetune would train, tokenized by prepare_data.py\n\
         dataset: edgetune_rows\n\
         dataset_dir: .\n\
         tokenized_path: tokenized\n\
         neat_packing: true\n\
         disable_shuffling: true\n\
         ### output\n\
         output_dir: output\n\
         logging_steps: 1\n\
         report_to: none\n\
         overwrite_output_dir: true\n\
         ### train: one row a device per micro-step, {per_step} rows a step\n\
         per_device_train_batch_size: 1\n\
         gradient_accumulation_steps: {accum}\n\
         max_steps: {steps}\n\
         learning_rate: {lr}\n\
         lr_scheduler_type: {sched}\n\
         warmup_steps: {warmup}\n\
         weight_decay: {wd}\n\
         adam_beta1: {b1}\n\
         adam_beta2: {b2}\n\
         adam_epsilon: {eps}\n\
         max_grad_norm: {clip}\n\
         seed: {seed}\n\
         disable_gradient_checkpointing: {no_gc}\n\
         bf16: {bf16}\n\
         {eval}\
         # deepspeed: deepspeed_zero2.json\n",
        base = job["base"]["path"].as_str().unwrap_or_default(),
        r = cfg.lora.r,
        alpha = t_num(&job["lora"]["alpha"]),
        dropout = t_num(&job["lora"]["dropout"]),
        rslora = cfg.lora.use_rslora,
        accum = per_step / a.gpus,
        steps = t["max_steps"],
        lr = t_num(&t["learning_rate"]),
        warmup = t["warmup_steps"],
        wd = t_num(&t["weight_decay"]),
        b1 = t_num(&t["adam_beta1"]),
        b2 = t_num(&t["adam_beta2"]),
        eps = t_num(&t["adam_epsilon"]),
        clip = t_num(&t["max_grad_norm"]),
        seed = t["seed"],
        no_gc = !cfg.gradient_checkpointing,
        bf16 = nf4,
    )
}

/// A number as YAML 1.1 (PyYAML) reads it as a float: `1.0e-8`, not `1e-8` (a string there).
fn t_num(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.split_once('e') {
        Some((m, e)) if !m.contains('.') => format!("{m}.0e{e}"),
        _ => s,
    }
}

fn lf_run_sh(gpus: usize) -> String {
    format!(
        "#!/usr/bin/env bash\n\
         # Trains this job with LLaMA-Factory (written by edgetune export-job). bash run.sh [extra llamafactory-cli args]\n\
         set -euo pipefail\n\
         cd \"$(dirname \"$0\")\"\n\
         [ -d tokenized ] || python3 prepare_data.py\n\
         if [ {gpus} -gt 1 ]; then export FORCE_TORCHRUN=1 NPROC_PER_NODE={gpus}; fi\n\
         exec llamafactory-cli train job.yaml \"$@\"\n"
    )
}

fn lf_readme(a: &ExportJobArgs, plan: &RunPlan, rows: usize, per_step: usize, from_gguf: bool) -> String {
    let t = &a.train;
    let base = if from_gguf {
        format!(
            "`base/`, `{}` converted to a Hugging Face folder (f32, the values edgetune quantizes)",
            t.model.display()
        )
    } else {
        format!("`{}` (referenced, not copied)", t.model.display())
    };
    format!(
        "# A training job exported by edgetune for LLaMA-Factory\n\n\
         `edgetune export-job --to llamafactory` wrote this folder from `{model}` and `{data}`. It trains what \
         `edgetune train` would have trained with the same arguments: the same samples in the same {steps} steps, from \
         the same starting adapter, with the same settings.\n\n\
         ```bash\n\
         pip install -r requirements.txt\n\
         bash run.sh        # prepare_data.py, then llamafactory-cli train job.yaml ({gpus} GPU(s): torchrun when more than one)\n\
         ```\n\n\
         The adapter is written to `output/` (PEFT). Bring it back with `edgetune import --model {model} --adapter \
         output`. The base model: {base}. For DeepSpeed ZeRO-2, uncomment `deepspeed:` in `job.yaml`.\n\n\
         ## Why the data is pre-tokenized\n\n\
         LLaMA-Factory formats conversations with its own templates (or one it parses from the tokenizer's chat \
         template) and packs and shuffles samples its own way; edgetune's ids come from the model's chat template, its \
         packing and chained conversations, and its order. So `data/train.jsonl` holds the {rows} rows edgetune would \
         train ({per_step} a step: one packed micro-batch a row), and `prepare_data.py` writes them as the tokenized \
         dataset LLaMA-Factory loads from `tokenized_path`: `attention_mask` numbers each row's samples 1, 2, 3, ... so \
         that neat packing gives a block-diagonal causal mask (no sample attends to another; positions run on across a \
         row, which RoPE's relative positions make equivalent to edgetune's restart at each sample), `labels` are -100 \
         where nothing is trained, and `disable_shuffling` keeps the order. `dataset_info.json` only names the rows, \
         because the parser wants a dataset for training; with `tokenized_path` nothing else is read. \
         `gradient_accumulation_steps` is {per_step} / {gpus} GPU(s): on another number of GPUs, export again with \
         `--gpus`.\n\n\
         ## What does not carry over exactly\n\n\
         - Arithmetic: bf16 on a 4-bit base (edgetune computes in f32); LoRA dropout's random masks; the validation loss \
           is the mean of each validation row's mean.\n\
         - `train_config.toml` holds edgetune's resolved settings, `job.json` the same as plain values.\n",
        model = t.model.display(),
        data = t.data.display(),
        steps = plan.total_steps(),
        gpus = a.gpus,
    )
}

fn accelerate_yaml(kind: &str, processes: usize, deepspeed: bool) -> String {
    let mut s = format!(
        "# accelerate launch --config_file THIS train.py (written by edgetune export-job)\n\
         compute_environment: LOCAL_MACHINE\n\
         distributed_type: {kind}\n\
         num_machines: 1\n\
         machine_rank: 0\n\
         num_processes: {processes}\n\
         mixed_precision: bf16\n\
         use_cpu: false\n"
    );
    if deepspeed {
        s.push_str(
            "deepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: none\n  offload_param_device: none\n  \
             zero3_init_flag: false\n",
        );
    }
    s
}

fn run_sh() -> String {
    "#!/usr/bin/env bash\n\
     # Trains this job (written by edgetune export-job). bash run.sh [single|multi|deepspeed|f32] [train.py flags]\n\
     #   single     one GPU, 4-bit NF4 base, bf16 (the default)\n\
     #   multi      every GPU of accelerate/multi_gpu.yaml (num_processes), data parallel\n\
     #   deepspeed  DeepSpeed ZeRO-2 on those GPUs (pip install deepspeed)\n\
     #   f32        f32 weights and arithmetic, no 4-bit: on a CPU, or to compare with edgetune\n\
     set -euo pipefail\n\
     cd \"$(dirname \"$0\")\"\n\
     mode=\"${1:-single}\"\n\
     [ $# -gt 0 ] && shift\n\
     case \"$mode\" in\n  \
       single) exec accelerate launch --config_file accelerate/single_gpu.yaml train.py \"$@\" ;;\n  \
       multi) exec accelerate launch --config_file accelerate/multi_gpu.yaml train.py \"$@\" ;;\n  \
       deepspeed) exec accelerate launch --config_file accelerate/deepspeed_zero2.yaml train.py \"$@\" ;;\n  \
       f32) exec python3 train.py --f32 \"$@\" ;;\n  \
       *) echo \"run.sh: unknown mode '$mode' (single, multi, deepspeed or f32)\" >&2; exit 2 ;;\n\
     esac\n"
        .to_string()
}

fn readme(a: &ExportJobArgs, plan: &RunPlan, rows: usize, per_step: usize, from_gguf: bool) -> String {
    let cfg = &plan.config;
    let t = &a.train;
    let o = &cfg.optimizer;
    let accum = accumulation(cfg.grad_accum, a.gpus);
    let base = if from_gguf {
        format!(
            "`base/`: `{}` converted to a Hugging Face folder, every weight as its GGUF blocks decode, in f32 \
             (what edgetune quantizes to NF4, so bitsandbytes quantizes the same values)",
            t.model.display()
        )
    } else {
        format!("`{}` (referenced, not copied)", t.model.display())
    };
    let quant = match t.quant {
        Quant::None => "none: f32 weights, as edgetune's `--quant none`".to_string(),
        Quant::Gguf if from_gguf => "4-bit NF4 with bitsandbytes (edgetune keeps the values of the GGUF file's \
                                     quantized tensors with `--quant gguf`, its default; bitsandbytes has no such \
                                     format, so NF4 of the same decoded values is the closest; with \
                                     `--quant nf4` edgetune holds exactly these)"
            .to_string(),
        // NF4 throughout, as a Hugging Face folder is held with either 4-bit setting.
        Quant::Nf4 | Quant::Gguf => "4-bit NF4 with bitsandbytes, blocks of 64, one f32 absmax a block (no double \
                                     quantization): the same 4-bit weights edgetune trains on, bit for bit"
            .to_string(),
    };
    let rows_text = if a.gpus == 1 {
        format!(
            "one row is one of edgetune's packed micro-batches (up to {} tokens); a step sums {accum}",
            cfg.batch_tokens.unwrap_or_default()
        )
    } else {
        format!(
            "each step's samples are spread over {per_step} rows ({} GPUs x {accum} accumulation steps), each \
             row to the GPU with the fewest tokens, so a step trains the same samples as edgetune's",
            a.gpus
        )
    };
    format!(
        "# A training job exported by edgetune\n\n\
         `edgetune export-job --to trl` wrote this folder from `{model}` and `{data}`. It trains what `edgetune \
         train` would have trained with the same arguments: the same samples in the same steps, from the same \
         starting adapter, with the same settings, on TRL's SFTTrainer (PEFT, bitsandbytes), which accelerate \
         and DeepSpeed spread over NVIDIA GPUs.\n\n\
         ```bash\n\
         pip install -r requirements.txt\n\
         bash run.sh                # one GPU\n\
         bash run.sh multi          # {gpus} GPUs (accelerate/multi_gpu.yaml)\n\
         bash run.sh deepspeed      # DeepSpeed ZeRO-2 on {gpus} GPUs\n\
         bash run.sh f32            # no GPU: f32 on the CPU (slow, exact)\n\
         ```\n\n\
         The adapter is written to `output/adapter` (PEFT). Bring it back with `edgetune import --model {model} \
         --adapter output/adapter`, then `edgetune generate --model {model} --adapter output/adapter`, or the \
         same folder from the C ABI and Python.\n\n\
         ## What is here\n\n\
         | file | what |\n| --- | --- |\n\
         | `job.json` | every setting `train.py` reads |\n\
         | `train.py` | the TRL script |\n\
         | `data/train.jsonl` | {rows} rows, {per_step} a step, in training order: {rows_text} |\n\
         | `data/validation.jsonl` | the validation batches ({val} samples), when the run validates |\n\
         | `init_adapter/` | the adapter training starts from (edgetune's seeded initialization, or `--init-adapter`) |\n\
         | `train_config.toml` | edgetune's resolved settings: `edgetune train --config train_config.toml` repeats the run locally |\n\
         | `accelerate/` | one GPU, {gpus} GPUs, DeepSpeed ZeRO-2 |\n\n\
         The base model: {base}.\n\n\
         ## The settings\n\n\
         | edgetune | value | TRL / transformers |\n| --- | --- | --- |\n\
         | lora r, alpha, dropout, rsLoRA | {r}, {alpha}, {dropout}, {rslora} | `init_adapter/adapter_config.json` |\n\
         | steps | {steps} | `max_steps` |\n\
         | learning_rate | {lr:e} | `learning_rate` |\n\
         | lr_schedule, warmup_steps | {sched:?}, {warmup} | `lr_scheduler_type` {hf_sched}, `warmup_steps` (the same formulas) |\n\
         | optimizer | AdamW, betas ({b1}, {b2}), eps {eps:e}, weight decay {wd} | `adam_beta1/2`, `adam_epsilon`, `weight_decay` |\n\
         | max_grad_norm | {clip} | `max_grad_norm` |\n\
         | batch_tokens x grad_accum | {bt} x {ga} | per-device batch 1 (one row), padding-free; {per_step} rows a step, so `gradient_accumulation_steps` is {per_step} / processes ({accum} on {gpus} GPU(s); on fewer, more) |\n\
         | loss | mean over the step's trained tokens | the same: transformers divides by the step's trained tokens across accumulation and devices |\n\
         | gradient_checkpointing | {gc} | `gradient_checkpointing` |\n\
         | seed | {seed} | `seed` (the data order is fixed by the rows; the seed drives LoRA dropout) |\n\
         | 4-bit base | {quant} | `BitsAndBytesConfig` |\n\n\
         ## What does not carry over exactly\n\n\
         - Arithmetic: on a GPU the script computes in bf16 (`bf16=True`) and TRL keeps the LoRA weights in bf16 on \
           a 4-bit base, as the QLoRA paper does; edgetune computes and keeps them in f32. `bash run.sh f32` is f32 \
           throughout, and matches edgetune's steps within float rounding.\n\
         - LoRA dropout draws other random masks than edgetune's (the same rate).\n\
         - The validation loss transformers reports is the mean of each validation row's mean; edgetune's is the mean \
           over all validation tokens.\n\
         - The data is pre-tokenized rather than written as conversations: TRL's assistant-only loss needs chat \
           templates with generation markers, which this model's template may not have, and it would pack, chain and \
           order the samples its own way. The ids are the chat template's tokens, as transformers' \
           `apply_chat_template` gives them; `sources` in each row names the record of each sample.\n",
        model = t.model.display(),
        data = t.data.display(),
        gpus = a.gpus,
        val = plan.val.samples.len(),
        r = cfg.lora.r,
        alpha = cfg.lora.alpha,
        dropout = cfg.lora.dropout,
        rslora = cfg.lora.use_rslora,
        steps = plan.total_steps(),
        lr = plan.learning_rate(),
        sched = cfg.lr_schedule,
        hf_sched = scheduler(cfg.lr_schedule),
        warmup = plan.warmup_steps(),
        b1 = o.beta1,
        b2 = o.beta2,
        eps = o.eps,
        wd = o.weight_decay,
        clip = o.max_grad_norm,
        bt = cfg.batch_tokens.unwrap_or_default(),
        ga = cfg.grad_accum,
        gc = cfg.gradient_checkpointing,
        seed = cfg.seed,
    )
}
