//! The `edgetune` command line: inspect a model, generate text (with or without an adapter),
//! score a text file, fine-tune a LoRA adapter and export checkpoints.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod batch;
mod interrupt;
mod train;

use clap::{Parser, Subcommand};
use edgetune::gpu::GpuOptions;
use edgetune::infer::GenerateOptions;
use edgetune::model::llama::{LoadOptions, Quant};
use edgetune::tokenizer::Message;
use edgetune::train::Precision;
use edgetune::{Error, Result, Session};
use train::TrainArgs;

#[derive(Parser)]
#[command(name = "edgetune", version, about = "Fine-tune and run LLMs on any GPU (WGSL on wgpu)")]
struct Cli {
    /// GPU to use (substring of its adapter name); default: EDGETUNE_ADAPTER, else a discrete GPU.
    #[arg(long, global = true)]
    gpu: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// How linear weights are held on the GPU: nf4 or none (f32).
    #[arg(long, default_value = "nf4")]
    quant: Quant,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// A PEFT LoRA adapter folder to apply (unmerged).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, parameter count, tensor types and a GPU memory estimate.
    Info {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
    },
    /// Generate text from a prompt (or, with --chat, as the assistant's reply).
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        /// The prompt (or use --prompts-file).
        #[arg(long, required_unless_present = "prompts_file")]
        prompt: Option<String>,
        /// A file with one prompt per line, each answered in turn by the same loaded model.
        #[arg(long, conflicts_with = "prompt")]
        prompts_file: Option<PathBuf>,
        /// Render the prompt as a user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when this text is generated (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Mean token loss and perplexity: of every token of a text file (--text), or of the
    /// assistant turns of chat records (--data), as training scores them, for the base model and
    /// the adapter.
    Eval {
        #[command(flatten)]
        m: ModelArgs,
        /// A text file: every token is scored.
        #[arg(long, required_unless_present = "data", conflicts_with = "data")]
        text: Option<PathBuf>,
        /// Records in any training format (JSONL, a folder): the tokens training would train on
        /// are scored, with the same chat template and mask.
        #[arg(long)]
        data: Option<PathBuf>,
        /// System message for conversations without one (as given to train's --system).
        #[arg(long, requires = "data")]
        system: Option<String>,
    },
    /// Show the GPU adapter edgetune would use.
    Gpu,
    /// Fine-tune a LoRA adapter on a dataset (settings from --config, then the flags).
    Train(Box<TrainArgs>),
    /// Fine-tune one adapter per job (user) from a JSONL file or folder of jobs, loading the
    /// base model once; re-runs skip finished jobs and resume interrupted ones.
    Batch(Box<batch::BatchArgs>),
    /// Training throughput (tokens/s) and GPU memory of LoRA steps on random tokens, with and
    /// without gradient checkpointing.
    BenchTrain {
        #[command(flatten)]
        m: ModelArgs,
        /// Tokens per step (one packed sample).
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Timed steps per mode (after a two-token warm-up step that compiles the kernels).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// After the timed steps, run one more step per mode with every dispatch waited for,
        /// and print the time spent in each shader.
        #[arg(long)]
        profile: bool,
        /// Storage of the saved activations: f32 or f16.
        #[arg(long, default_value_t = Precision::F32)]
        activations: Precision,
    },
    /// Merge a PEFT adapter into its base model and write a Hugging Face folder (f16 or bf16).
    Merge {
        /// The base model: a Hugging Face folder or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The PEFT adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// The folder to write (config.json, tokenizer files, model*.safetensors).
        #[arg(long)]
        output: PathBuf,
        /// f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: edgetune::lora::merge::MergeDtype,
    },
    /// Write a training checkpoint's adapter as a PEFT adapter folder.
    Export {
        /// The model the checkpoint was trained on (for the shapes and the base model name).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        checkpoint: PathBuf,
        /// The PEFT adapter folder to write.
        #[arg(long)]
        output: PathBuf,
        /// Export the last parameters rather than the best ones by validation loss.
        #[arg(long)]
        last: bool,
    },
    /// Forward throughput (prefill and decode tokens/s) and GPU memory.
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Tokens in the prefill pass.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prefill.
        #[arg(long, default_value_t = 16)]
        decode_tokens: usize,
        /// Timed repetitions of the prefill.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

fn load(m: &ModelArgs, gpu: &GpuOptions) -> Result<Session> {
    let load = LoadOptions { quant: m.quant, max_context: m.max_context, ..Default::default() };
    let mut s = Session::open(&m.model, gpu, &load)?;
    if let Some(dir) = &m.adapter {
        s.load_adapter(dir)?;
    }
    Ok(s)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let gpu = GpuOptions { adapter: cli.gpu, ..Default::default() };
    match cli.cmd {
        Cmd::Gpu => {
            let ctx = edgetune::gpu::GpuContext::new(&gpu)?;
            println!("{}", ctx.report);
        }
        Cmd::Bench { m, prompt_tokens, decode_tokens, repeat } => {
            bench(&m, &gpu, prompt_tokens, decode_tokens, repeat)?
        }
        Cmd::Info { model } => {
            let (cfg, src) = edgetune::model::open_weights(&model)?;
            let tensors = src.list();
            let mut types: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
            let mut stored = 0usize;
            for t in &tensors {
                let e = types.entry(t.dtype.clone()).or_default();
                e.0 += 1;
                e.1 += t.bytes;
                stored += t.bytes;
            }
            let params = cfg.parameter_count();
            let emb = cfg.vocab_size * cfg.hidden_size * if cfg.tie_word_embeddings { 1 } else { 2 };
            let norms = (2 * cfg.num_layers + 1) * cfg.hidden_size;
            let linear = params - emb - norms;
            // NF4: half a byte per linear weight plus one f32 absmax per 64; f16 embedding and
            // lm_head tables; f32 norms (and biases, counted with the linear weights here).
            let nf4_bytes = linear / 2 + linear / 64 * 4 + emb * 2 + norms * 4;
            println!("model: {}", model.display());
            println!(
                "architecture: {} ({} layers, hidden {}, heads {}/{} kv, head_dim {}, ffn {}, vocab {})",
                cfg.arch.name(),
                cfg.num_layers,
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.vocab_size
            );
            println!(
                "rope: theta {}, scaling {:?}; tied embeddings: {}; qkv bias: {}",
                cfg.rope_theta, cfg.rope_scaling, cfg.tie_word_embeddings, cfg.qkv_bias
            );
            println!("parameters: {params} ({:.1} M)", params as f64 / 1e6);
            println!("stored: {} tensors, {:.1} MiB", tensors.len(), stored as f64 / 1048576.0);
            for (ty, (n, b)) in types {
                println!("  {ty:<6} {n:>4} tensors {:>9.1} MiB", b as f64 / 1048576.0);
            }
            println!(
                "GPU weights estimate: nf4 {:.1} MiB, none (f32) {:.1} MiB (plus KV cache and activations)",
                nf4_bytes as f64 / 1048576.0,
                (params * 4) as f64 / 1048576.0
            );
        }
        Cmd::Generate { m, prompt, prompts_file, chat, system, max_tokens, temperature, top_k, top_p, seed, stop } => {
            let prompts = match (prompt, prompts_file) {
                (Some(p), _) => vec![p],
                (None, Some(file)) => {
                    let text =
                        std::fs::read_to_string(&file).map_err(|e| Error::Io { path: file.clone(), source: e })?;
                    let list: Vec<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                    if list.is_empty() {
                        return Err(Error::Format { path: file, what: "holds no prompts (one per line)".into() });
                    }
                    list
                }
                (None, None) => unreachable!("clap requires --prompt or --prompts-file"),
            };
            let s = load(&m, &gpu)?;
            let opts = GenerateOptions { max_new_tokens: max_tokens, temperature, top_k, top_p, seed, stop };
            let print = |t: &str| {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "{t}");
                let _ = out.flush();
                true
            };
            let many = prompts.len() > 1;
            for prompt in prompts {
                if many {
                    println!("> {prompt}");
                }
                if chat {
                    let mut msgs = Vec::new();
                    if let Some(sys) = &system {
                        msgs.push(Message::new("system", sys.clone()));
                    }
                    msgs.push(Message::new("user", prompt));
                    s.chat(&msgs, &opts, print)?;
                } else {
                    print(&prompt);
                    s.generate(&prompt, &opts, print)?;
                }
                println!();
                if many {
                    println!();
                }
            }
        }
        Cmd::Train(args) => {
            if !train::run(*args, &gpu)? {
                return Ok(ExitCode::from(130));
            }
        }
        Cmd::Batch(args) => {
            if !batch::run(*args, &gpu)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::BenchTrain { m, seq, rank, steps, profile, activations } => {
            bench_train(&m, &gpu, seq, rank, steps, profile, activations)?
        }
        Cmd::Merge { model, adapter, output, dtype } => {
            let (cfg, _) = edgetune::model::open_weights(&model)?;
            let a = edgetune::lora::peft::load(&adapter, &cfg)?;
            let shards = edgetune::lora::merge::merge(&model, &a, &output, dtype)?;
            eprintln!("wrote {} ({shards} weight file(s), {dtype:?})", output.display());
        }
        Cmd::Export { model, checkpoint, output, last } => train::export(&model, &checkpoint, &output, last)?,
        Cmd::Eval { m, data: Some(data), system, .. } => {
            let s = load(&m, &gpu)?;
            let cfg = edgetune::data::DataConfig {
                val_fraction: Some(0.0),
                max_len: m.max_context,
                system,
                ..Default::default()
            };
            let d = edgetune::data::load(&data, &s.tokenizer, &cfg)?;
            let (base, n) = s.samples_loss(&d.train, false)?;
            println!("{} samples, {n} scored tokens ({})", d.train.len(), data.display());
            println!("base:    mean loss {base:.6}, perplexity {:.4}", f64::from(base).exp());
            if s.adapter.is_some() {
                let (tuned, _) = s.samples_loss(&d.train, true)?;
                println!("adapter: mean loss {tuned:.6}, perplexity {:.4}", f64::from(tuned).exp());
            }
        }
        Cmd::Eval { m, text, .. } => {
            let text = text.ok_or_else(|| Error::Invalid {
                field: "eval".into(),
                what: "give --text FILE or --data FILE".into(),
            })?;
            let bytes = std::fs::read(&text).map_err(|e| Error::Io { path: text.clone(), source: e })?;
            let body = String::from_utf8(bytes).map_err(|e| Error::Format {
                path: text.clone(),
                what: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
            })?;
            let s = load(&m, &gpu)?;
            let loss = s.mean_loss(&body)?;
            println!("mean token loss: {loss:.6}");
            println!("perplexity: {:.4}", f64::from(loss).exp());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn bench(m: &ModelArgs, gpu: &GpuOptions, prompt_tokens: usize, decode_tokens: usize, repeat: usize) -> Result<()> {
    use std::time::Instant;
    let ctx = std::sync::Arc::new(edgetune::gpu::GpuContext::new(gpu)?);
    let before = ctx.allocated_bytes();
    let t0 = Instant::now();
    let load = LoadOptions { quant: m.quant, max_context: m.max_context, ..Default::default() };
    let s = Session::open_with(ctx.clone(), &m.model, &load)?;
    let model = &s.model;
    println!("{}", ctx.report);
    println!("model: {} ({:?}), loaded in {:.2} s", m.model.display(), m.quant, t0.elapsed().as_secs_f64());
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..prompt_tokens as u32).map(|i| (i * 7919 + 13) % v).collect();
    // Warm-up: compiles every pipeline.
    let mut cache = model.new_cache();
    model.next_logits(&ids[..prompt_tokens.min(8)], &mut cache)?;
    let mut peak = ctx.allocated_bytes();
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let mut cache = model.new_cache();
        let t = Instant::now();
        model.next_logits(&ids, &mut cache)?;
        best = best.min(t.elapsed().as_secs_f64());
        peak = peak.max(ctx.allocated_bytes());
    }
    let mut cache = model.new_cache();
    model.next_logits(&ids, &mut cache)?;
    let t = Instant::now();
    for i in 0..decode_tokens {
        model.next_logits(&[ids[i % ids.len()]], &mut cache)?;
    }
    let decode = t.elapsed().as_secs_f64();
    peak = peak.max(ctx.allocated_bytes());
    println!(
        "prefill: {prompt_tokens} tokens in {:.3} s = {:.1} tokens/s (best of {repeat})",
        best,
        prompt_tokens as f64 / best
    );
    if decode_tokens > 0 {
        println!(
            "decode: {decode_tokens} tokens in {:.3} s = {:.2} tokens/s ({:.1} ms/token)",
            decode,
            decode_tokens as f64 / decode,
            decode * 1e3 / decode_tokens as f64
        );
    }
    let weights = model.weight_bytes;
    let kv = model.kv_cache_bytes();
    let act = model.activation_bytes(prompt_tokens, 1);
    println!(
        "expected GPU memory: weights {} + one KV cache {} + activations {} = {}",
        mib(weights),
        mib(kv),
        mib(act),
        mib(weights + 2 * kv + act)
    );
    println!("  (two KV caches are live at the peak: the benchmark's and the warm-up's)");
    match (before, peak) {
        (Some(b), Some(p)) => println!("driver allocator: {} allocated at peak ({} before loading)", mib(p), mib(b)),
        _ => println!("driver allocator: not reported by this backend"),
    }
    Ok(())
}

fn bench_train(
    m: &ModelArgs,
    gpu: &GpuOptions,
    seq: usize,
    rank: usize,
    steps: usize,
    profile: bool,
    activations: Precision,
) -> Result<()> {
    use edgetune::lora::{Adapter, GpuAdapter, LoraConfig};
    use edgetune::model::training::{Batch, WorkspacePlan};
    use edgetune::train::optimizer::{AdamwConfig, Optimizer};
    use std::time::Instant;
    let ctx = std::sync::Arc::new(edgetune::gpu::GpuContext::new(gpu)?);
    let before = ctx.allocated_bytes();
    let load = LoadOptions { quant: m.quant, max_context: m.max_context.max(seq), ..Default::default() };
    let model = edgetune::model::llama::Model::open(ctx.clone(), &m.model, &load)?;
    println!("{}", ctx.report);
    let cfg = LoraConfig { r: rank, alpha: 2.0 * rank as f32, ..Default::default() };
    let adapter = Adapter::new(&model.config, cfg)?;
    let n = adapter.layout.len;
    let lora = GpuAdapter::upload(&ctx, &adapter);
    let mut opt = Optimizer::new(&ctx, n, AdamwConfig::default())?;
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..seq as u32).map(|i| (i * 7919 + 13) % v).collect();
    let train = vec![true; seq];
    let batch = Batch::pack([(&ids[..], &train[..])])?;
    println!(
        "model: {} ({:?}), seq {seq}, LoRA r {rank} on all linear layers ({n} parameters)",
        m.model.display(),
        m.quant
    );
    let adapter_bytes = (n * 4 * 4) as u64; // parameters, gradients, two AdamW moments
    println!("saved activations: {activations}");
    for checkpointing in [true, false] {
        let ws = model.workspace(WorkspacePlan { checkpointing, activations, ..WorkspacePlan::new(seq, rank) })?;
        let mut step = |batch: &Batch| -> Result<f64> {
            let t = Instant::now();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            opt.zero_grad(&mut enc);
            model.forward_backward(&mut enc, &ws, batch, &lora, &opt.grads, 1.0 / batch.len() as f32)?;
            opt.record_step(&ctx, &mut enc, &lora.params, 1e-4)?;
            ctx.queue.submit([enc.finish()]);
            let norm = ctx.read_f32(&opt.norm, 1)?[0];
            opt.commit(norm);
            Ok(t.elapsed().as_secs_f64())
        };
        // Warm-up on two tokens: compiles every pipeline without paying for a full step.
        step(&Batch::pack([(&ids[..2], &train[..2])])?)?;
        let mut times = Vec::new();
        for _ in 0..steps.max(1) {
            times.push(step(&batch)?);
        }
        let peak = ctx.allocated_bytes();
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        let total = model.weight_bytes + adapter_bytes + ws.bytes;
        println!(
            "gradient checkpointing {}: {:.2} s/step (best of {}), {:.1} tokens/s",
            if checkpointing { "on " } else { "off" },
            best,
            times.len(),
            seq as f64 / best
        );
        println!(
            "  expected GPU memory: weights {} + adapter, gradients and AdamW moments {} + activations {} = {}",
            mib(model.weight_bytes),
            mib(adapter_bytes),
            mib(ws.bytes),
            mib(total)
        );
        match (before, peak) {
            (Some(b), Some(p)) => println!("  driver allocator: {} allocated ({} before loading)", mib(p), mib(b)),
            _ => println!("  driver allocator: not reported by this backend"),
        }
        if profile {
            ctx.set_profiling(true);
            let total = step(&batch)?;
            let kernels = ctx.profile();
            ctx.set_profiling(false);
            println!("  one step with every dispatch waited for: {total:.2} s");
            for (name, t) in kernels.iter().take(12) {
                println!(
                    "    {name:<28} {:>8.3} s {:>5.1}%  ({} dispatches)",
                    t.seconds,
                    100.0 * t.seconds / total,
                    t.dispatches
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
