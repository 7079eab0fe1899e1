//! The `edgetune` command line: inspect a model, generate text (with or without an adapter),
//! score a text file, fine-tune a LoRA adapter and export checkpoints. The binary (`src/main.rs`)
//! is [`main`]; the library form lets the workspace's integration tests build the same program.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod batch;
mod bench;
mod claim;
mod export_job;
mod interrupt;
mod train;

use clap::{Parser, Subcommand};
use edgetune::gpu::GpuOptions;
use edgetune::infer::GenerateOptions;
use edgetune::model::llama::{LoadOptions, Quant};
use edgetune::session::{AnswerEvent, ManyRequests, Prompt};
use edgetune::tokenizer::Message;
use edgetune::train::Precision;
use edgetune::{Error, Result, Session};
use train::TrainArgs;

#[derive(Parser)]
#[command(name = "edgetune", version, about = "Fine-tune and run LLMs on any GPU (WGSL on wgpu)")]
struct Cli {
    /// GPU to use: a substring of its adapter name, or #N for the N-th adapter (from 0, in the
    /// order `edgetune gpu` errors list them); default: EDGETUNE_ADAPTER, else a discrete GPU.
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
    /// How linear weights are held on the GPU: gguf (a GGUF file's quantized tensors keep their
    /// own values, NF4 for its other weights and for a Hugging Face folder), nf4 (NF4
    /// throughout) or none (f32).
    #[arg(long, default_value = "gguf")]
    quant: Quant,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// A LoRA adapter to apply (unmerged): a PEFT folder or a GGUF LoRA file. `generate` takes
    /// several, kept on the GPU together, and answers each prompt with each.
    #[arg(long)]
    adapter: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct BenchModel {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long, required_unless_present = "random_weights", conflicts_with = "random_weights")]
    model: Option<PathBuf>,
    /// No model file: random weights of a named shape (smollm2-135m, qwen2.5-0.5b, qwen3-0.6b,
    /// gemma-3-1b, llama-3.2-1b, qwen2.5-1.5b, llama-3.1-8b) or of a config.json, quantized like
    /// real ones.
    #[arg(long, value_name = "SHAPE")]
    random_weights: Option<String>,
    /// How linear weights are held on the GPU: gguf (a GGUF file's quantized tensors keep their
    /// own values, NF4 for its other weights and for a Hugging Face folder), nf4 (NF4
    /// throughout) or none (f32).
    #[arg(long, default_value = "gguf")]
    quant: Quant,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Checkpointing {
    On,
    Off,
    Both,
}

/// What `edgetune merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MergeFormat {
    /// A Hugging Face folder.
    Hf,
    /// One GGUF file.
    Gguf,
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
        /// With several prompts or adapters: how many answers are decoded together, each step
        /// one token of each in one pass, a row taking the next answer when its own ends (each
        /// row's KV cache holds the longest prompt and --max-tokens).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        rows: u16,
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
        /// Answer each record's last user message (greedy) with the base model and the adapter,
        /// and score the answers against the record's own last answer: exact match and token
        /// F1 (as SQuAD's evaluation computes them) and ROUGE-L (as rouge-score does).
        #[arg(long, requires = "data")]
        generate: bool,
        /// With --generate: the most tokens of each answer.
        #[arg(long, default_value_t = 64, requires = "generate")]
        max_tokens: usize,
        /// With --generate: also write every answer and its scores, and the means, as JSON.
        #[arg(long, requires = "generate")]
        report: Option<PathBuf>,
        /// Preference pairs with an adapter: the beta of the DPO loss and rewards reported (the
        /// adapter against the base model as the reference).
        #[arg(long, default_value_t = 0.1, requires = "data")]
        beta: f32,
    },
    /// Show the GPU adapter edgetune would use.
    Gpu,
    /// Fine-tune a LoRA adapter on a dataset (settings from --config, then the flags).
    Train(Box<TrainArgs>),
    /// Write the job `train` would run (same arguments) for TRL's SFTTrainer on NVIDIA GPUs
    /// (accelerate, DeepSpeed): the data as it would be trained, the settings, the starting
    /// adapter and a script.
    ExportJob(Box<export_job::ExportJobArgs>),
    /// Check an adapter trained elsewhere (a PEFT folder, a GGUF LoRA file) against the base
    /// model and say what it holds.
    Import {
        /// The base model the adapter was trained on.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter folder or a GGUF LoRA file.
        #[arg(long)]
        adapter: PathBuf,
    },
    /// Fine-tune one adapter per job (user) from a JSONL file or folder of jobs, loading the
    /// base model once; re-runs skip finished jobs and resume interrupted ones.
    Batch(Box<batch::BatchArgs>),
    /// Training throughput (tokens/s) and GPU memory of LoRA steps on random tokens, with and
    /// without gradient checkpointing.
    BenchTrain {
        #[command(flatten)]
        m: BenchModel,
        /// Tokens per step (one packed sample).
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Timed steps per mode (after a two-token warm-up step that compiles the kernels and
        /// a full-length one that allocates what the first step allocates).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Gradient checkpointing: on, off or both (each measured in turn).
        #[arg(long, value_enum, default_value_t = Checkpointing::Both)]
        checkpointing: Checkpointing,
        /// After the timed steps, run one more step per mode timing every dispatch (with GPU
        /// timestamp queries where the adapter has them, else wall-clock time with every
        /// dispatch waited for) and print the time, GFLOP/s and GB/s of each shader.
        #[arg(long)]
        profile: bool,
        /// Storage of the saved activations: f32 or f16.
        #[arg(long, default_value_t = Precision::F32)]
        activations: Precision,
    },
    /// Merge an adapter into its base model: a Hugging Face folder (f16 or bf16), or with
    /// `--format gguf` one GGUF file for llama.cpp, Ollama and LM Studio (from a GGUF base, or
    /// from a Llama, Mistral, Qwen2 or Qwen3 folder as llama.cpp's converter writes it).
    Merge {
        /// The base model: a Hugging Face folder or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The adapter: a PEFT folder or a GGUF LoRA file.
        #[arg(long)]
        adapter: PathBuf,
        /// The folder to write (config.json, tokenizer files, model*.safetensors), or the .gguf
        /// file with `--format gguf`.
        #[arg(long)]
        output: PathBuf,
        /// hf (a Hugging Face folder) or gguf (one file, with a Modelfile beside it).
        #[arg(long, value_enum, default_value = "hf")]
        format: MergeFormat,
        /// Folder weights: f16, bf16 or f32.
        #[arg(long, default_value = "f16")]
        dtype: edgetune::lora::merge::MergeDtype,
        /// GGUF tensor type: f32, f16, bf16, q8_0, q4_0 or q4_k.
        #[arg(long = "type", value_enum, default_value = "q8_0")]
        ty: train::GgufType,
    },
    /// Write an adapter, from a training checkpoint or an adapter, as a PEFT adapter folder or
    /// a GGUF LoRA adapter (llama.cpp's `--lora`, Ollama's `ADAPTER`).
    Export {
        /// The base model the adapter was trained on (for the shapes and the architecture).
        #[arg(long)]
        model: PathBuf,
        /// A training checkpoint (checkpoint.json beside its data).
        #[arg(long, conflicts_with = "adapter", required_unless_present = "adapter")]
        checkpoint: Option<PathBuf>,
        /// An adapter: a PEFT folder or a GGUF LoRA file.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The PEFT adapter folder or the .gguf file to write.
        #[arg(long)]
        output: PathBuf,
        /// Export the checkpoint's last parameters rather than the best ones by validation loss.
        #[arg(long)]
        last: bool,
        /// peft (a folder) or gguf (one file).
        #[arg(long, value_enum, default_value = "peft")]
        format: train::ExportFormat,
        /// The tensor type of a GGUF adapter: f32, f16, bf16 or q8_0.
        #[arg(long = "type", value_enum, default_value = "f16")]
        ty: train::GgufType,
    },
    /// Forward throughput (prefill and decode tokens/s) and GPU memory.
    Bench {
        #[command(flatten)]
        m: BenchModel,
        /// Tokens in the prefill pass.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prefill.
        #[arg(long, default_value_t = 16)]
        decode_tokens: usize,
        /// Timed repetitions of the prefill.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Run with a fresh LoRA adapter of this rank on the default modules applied (not
        /// merged), as generation with a named adapter runs; 0 for none.
        #[arg(long, default_value_t = 0)]
        lora_rank: usize,
        /// Also decode this many sequences of up to 64 prompt tokens, each with its own adapter
        /// (of --lora-rank, at least 16), one after another and then together in one pass a
        /// token, and compare their tokens/s; 1 for neither.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        rows: u16,
        /// After the timed runs, prefill the prompt once more and decode the same number of
        /// tokens again, timing every dispatch (GPU timestamp queries where the adapter has them,
        /// else wall-clock time with every dispatch waited for), and print each shader's time,
        /// GFLOP/s and GB/s, and how much of a decoded token's time the GPU spent in kernels.
        #[arg(long)]
        profile: bool,
    },
}

fn load(m: &ModelArgs, gpu: &GpuOptions) -> Result<Session> {
    let load = LoadOptions { quant: m.quant, max_context: m.max_context, ..Default::default() };
    let mut s = Session::open(&m.model, gpu, &load)?;
    match m.adapter.as_slice() {
        [] => {}
        [one] => s.load_adapter(one)?,
        _ => {
            return Err(Error::Invalid {
                field: "--adapter".into(),
                what: "only `generate` takes more than one".into(),
            });
        }
    }
    Ok(s)
}

/// A session for `generate`: one adapter is applied as usual; several are kept resident, by
/// their path as given, and their names returned in order.
fn load_resident(m: &ModelArgs, gpu: &GpuOptions) -> Result<(Session, Vec<String>)> {
    if m.adapter.len() < 2 {
        return Ok((load(m, gpu)?, Vec::new()));
    }
    let load = LoadOptions { quant: m.quant, max_context: m.max_context, ..Default::default() };
    let mut s = Session::open(&m.model, gpu, &load)?;
    let mut names = Vec::new();
    for path in &m.adapter {
        let name = path.display().to_string();
        let a = edgetune::lora::load(path, &s.model.config)?;
        s.keep_adapter(&name, &a)?;
        names.push(name);
    }
    Ok((s, names))
}

/// RoPE in one line: the base, the scaling in words, partial rotation and a sliding layers' base.
fn rope_summary(c: &edgetune::model::config::ModelConfig) -> String {
    use edgetune::model::config::RopeScaling;
    let scaling = match &c.rope_scaling {
        None => "no scaling".to_string(),
        Some(RopeScaling::Linear { factor }) => format!("linear scaling x{factor}"),
        Some(RopeScaling::Llama3 { factor, original_max_position, .. }) => {
            format!("llama3 scaling x{factor} from {original_max_position}")
        }
        Some(RopeScaling::Factors(f)) => format!("{} per-frequency factors", f.len()),
        Some(RopeScaling::LongRope { short_factor, original_max_position, attention_factor, .. }) => format!(
            "longrope ({} factor pairs, short ones up to {original_max_position} positions, attention factor {attention_factor:.4})",
            short_factor.len()
        ),
    };
    let mut s = format!("theta {}, {scaling}", c.rope_theta);
    if c.rotary_dim != c.head_dim {
        s.push_str(&format!(", {} of {} values a head rotated", c.rotary_dim, c.head_dim));
    }
    if let Some((theta, _)) = &c.sliding_rope {
        s.push_str(&format!("; sliding layers theta {theta}"));
    }
    s
}

fn run(cli: Cli) -> Result<ExitCode> {
    let gpu = GpuOptions { adapter: cli.gpu, ..Default::default() };
    match cli.cmd {
        Cmd::Gpu => {
            let ctx = edgetune::gpu::GpuContext::new(&gpu)?;
            println!("{}", ctx.report);
        }
        Cmd::Bench { m, prompt_tokens, decode_tokens, repeat, lora_rank, rows, profile } => {
            let rows = usize::from(rows);
            let b = bench::ForwardBench { prompt_tokens, decode_tokens, repeat, lora_rank, rows, profile };
            bench::forward(&m, &gpu, &b)?
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
            if cfg.multimodal {
                println!("multimodal: the text model is trained; the vision tower is kept as it is");
            }
            println!("rope: {}", rope_summary(&cfg));
            let mut features = vec![format!("tied embeddings: {}", cfg.tie_word_embeddings)];
            let flags = [
                (cfg.qkv_bias, "q/k/v biases"),
                (cfg.qk_norm, "q/k norms"),
                (cfg.sandwich_norms, "norms after attention and the MLP"),
                (cfg.fused_projections, "fused qkv_proj and gate_up_proj"),
                (cfg.hidden_act == edgetune::model::config::Activation::GeluTanh, "GeGLU (tanh GELU)"),
            ];
            features.extend(flags.iter().filter(|(on, _)| *on).map(|(_, what)| what.to_string()));
            if let Some(w) = cfg.sliding_window {
                let n = (0..cfg.num_layers).filter(|&l| cfg.layer_window(l).is_some()).count();
                features.push(format!("sliding window {w} on {n} of {} layers", cfg.num_layers));
            }
            if let Some(c) = cfg.attn_softcap {
                features.push(format!("attention scores soft-capped at {c}"));
            }
            if let Some(c) = cfg.final_softcap {
                features.push(format!("logits soft-capped at {c}"));
            }
            println!("{}", features.join("; "));
            println!("parameters: {params} ({:.1} M)", params as f64 / 1e6);
            println!("stored: {} tensors, {:.1} MiB", tensors.len(), stored as f64 / 1048576.0);
            for (ty, (n, b)) in types {
                println!("  {ty:<6} {n:>4} tensors {:>9.1} MiB", b as f64 / 1048576.0);
            }
            // What loading uploads, exactly (Model::planned_weight_bytes), and per weight.
            let on_gpu = |quant| {
                let bytes = edgetune::model::llama::Model::planned_weight_bytes(
                    &cfg,
                    &src,
                    &edgetune::model::llama::LoadOptions { quant, ..Default::default() },
                );
                format!("{:.1} MiB, {:.2} bits a weight", bytes as f64 / 1048576.0, bytes as f64 * 8.0 / params as f64)
            };
            let gguf = match src {
                edgetune::model::weights::WeightSource::Gguf(_) => {
                    format!("; gguf, the default (the file's own values) {}", on_gpu(Quant::Gguf))
                }
                _ => String::new(),
            };
            println!("GPU weights: nf4 {}{gguf}; none (f32) {}", on_gpu(Quant::Nf4), on_gpu(Quant::None));
            println!("  (plus the KV cache and activations)");
            // What each adapter kept on the GPU adds (Session::keep_adapter, generate --adapter).
            let lora = edgetune::lora::Layout::new(&cfg, &edgetune::lora::LoraConfig::default())?;
            println!(
                "each resident LoRA adapter (r 16, all linear layers, f32): {:.1} MiB",
                (lora.len * 4) as f64 / 1048576.0
            );
        }
        Cmd::Generate {
            m,
            prompt,
            prompts_file,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            rows,
        } => {
            let prompts = match (prompt, prompts_file) {
                (Some(p), _) => vec![p],
                (None, Some(file)) => {
                    let text = edgetune::files::read_config(&file)?;
                    let list: Vec<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                    if list.is_empty() {
                        return Err(Error::Format { path: file, what: "holds no prompts (one per line)".into() });
                    }
                    list
                }
                (None, None) => unreachable!("clap requires --prompt or --prompts-file"),
            };
            let (s, resident) = load_resident(&m, &gpu)?;
            let opts = GenerateOptions { max_new_tokens: max_tokens, temperature, top_k, top_p, seed, stop };
            let print = |t: &str| {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "{t}");
                let _ = out.flush();
                true
            };
            let messages = |prompt: &str| {
                let mut msgs = Vec::new();
                if let Some(sys) = &system {
                    msgs.push(Message::new("system", sys.clone()));
                }
                msgs.push(Message::new("user", prompt.to_string()));
                msgs
            };
            if prompts.len() == 1 && resident.len() < 2 {
                // One answer, streamed as it is decoded.
                if chat {
                    s.chat(&messages(&prompts[0]), &opts, print)?;
                } else {
                    print(&prompts[0]);
                    s.generate(&prompts[0], &opts, print)?;
                }
                println!();
                return Ok(ExitCode::SUCCESS);
            }
            // Each prompt answered by each adapter, named before its answer; `rows` answers are
            // decoded together, each with its own adapter, a row taking the next answer when its
            // own ends; each is printed as soon as it and those before it have ended.
            let adapters: Vec<Option<&str>> =
                if resident.is_empty() { vec![None] } else { resident.iter().map(|n| Some(n.as_str())).collect() };
            let pairs: Vec<(&str, Option<&str>)> =
                prompts.iter().flat_map(|p| adapters.iter().map(move |&a| (p.as_str(), a))).collect();
            let convs: Vec<Vec<Message>> =
                if chat { pairs.iter().map(|(p, _)| messages(p)).collect() } else { Vec::new() };
            let requests: Vec<(Option<&str>, Prompt)> = pairs
                .iter()
                .enumerate()
                .map(|(i, &(p, a))| (a, if chat { Prompt::Chat(&convs[i]) } else { Prompt::Text(p) }))
                .collect();
            let mut ended: Vec<Option<String>> = vec![None; pairs.len()];
            let mut printed = 0;
            let job = ManyRequests { requests: &requests, opts: &opts, rows: usize::from(rows) };
            s.answer_many(&job, |event| {
                if let AnswerEvent::End { request: i, generated: answer } = event {
                    ended[i] = Some(answer.text.clone());
                    while let Some(text) = ended.get_mut(printed).and_then(Option::take) {
                        let (prompt, adapter) = pairs[printed];
                        if printed % adapters.len() == 0 {
                            println!("> {prompt}");
                        }
                        if let Some(name) = adapter {
                            println!("[{name}]");
                        }
                        println!("{}{text}", if chat { "" } else { prompt });
                        if printed % adapters.len() == adapters.len() - 1 {
                            println!();
                        }
                        printed += 1;
                    }
                }
                true
            })?;
        }
        Cmd::Train(args) => {
            if !train::run(*args, &gpu)? {
                return Ok(ExitCode::from(130));
            }
        }
        Cmd::ExportJob(args) => {
            export_job::run(*args)?;
        }
        Cmd::Import { model, adapter } => import(&model, &adapter)?,
        Cmd::Batch(args) => {
            if !batch::run(*args, &gpu)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::BenchTrain { m, seq, rank, steps, checkpointing, profile, activations } => {
            let modes = match checkpointing {
                Checkpointing::On => vec![true],
                Checkpointing::Off => vec![false],
                Checkpointing::Both => vec![true, false],
            };
            bench::train(&m, &gpu, &bench::TrainBench { seq, rank, steps, modes, profile, activations })?
        }
        Cmd::Merge { model, adapter, output, format, dtype, ty } => {
            let (cfg, _) = edgetune::model::open_weights(&model)?;
            let a = edgetune::lora::load(&adapter, &cfg)?;
            match format {
                MergeFormat::Hf => {
                    let shards = edgetune::lora::merge::merge(&model, &a, &output, dtype)?;
                    eprintln!("wrote {} ({shards} weight file(s), {dtype:?})", output.display());
                }
                MergeFormat::Gguf => {
                    let m = edgetune::lora::merge::merge_gguf(&model, &a, &output, ty.ggml())?;
                    eprintln!("wrote {} ({} tensors, {})", output.display(), m.tensors, ty.ggml().name());
                    if m.fell_back > 0 {
                        eprintln!(
                            "{} matrices written as {}: their rows are no whole number of {} blocks",
                            m.fell_back,
                            edgetune::lora::merge::fallback(ty.ggml(), 32).name(),
                            ty.ggml().name()
                        );
                    }
                    train::write_modelfile(&output, &edgetune::lora::gguf::modelfile(&output, None))?;
                }
            }
        }
        Cmd::Export { model, checkpoint, adapter, output, last, format, ty } => train::export(&train::ExportArgs {
            model: &model,
            checkpoint: checkpoint.as_deref(),
            adapter: adapter.as_deref(),
            output: &output,
            last,
            format,
            ty,
        })?,
        Cmd::Eval { m, data: Some(data), system, generate: true, max_tokens, report, .. } => {
            let mut read = 0;
            let (records, bad) =
                edgetune::data::formats::read(&data, edgetune::data::formats::Format::Auto, &mut read)?;
            edgetune::data::formats::refuse_bad(&bad)?;
            let s = load(&m, &gpu)?;
            let opts = GenerateOptions { max_new_tokens: max_tokens, ..GenerateOptions::default() };
            let r = s.score_answers(&records, system.as_deref(), &opts, |i, n| eprint!("\ranswered {i} of {n}"))?;
            eprintln!();
            print_answer_report(&r, &data);
            if let Some(path) = report {
                let json = serde_json::to_vec_pretty(&r)
                    .map_err(|e| Error::Invalid { field: "report".into(), what: e.to_string() })?;
                edgetune::atomic::write_atomic(&path, &json)?;
                println!("report: {}", path.display());
            }
        }
        Cmd::Eval { m, data: Some(data), system, beta, .. } => {
            let s = load(&m, &gpu)?;
            let cfg = edgetune::data::DataConfig {
                val_fraction: Some(0.0),
                max_len: m.max_context,
                system,
                ..Default::default()
            };
            let d = edgetune::data::load(&data, &s.tokenizer, &cfg)?;
            if d.train.iter().any(|x| x.rejected_at.is_some()) && s.adapter.is_some() {
                let (loss, r) = s.preference_rewards(&d.train, beta)?;
                println!(
                    "{} preference pairs ({}), the adapter against the base as the reference:",
                    d.train.len(),
                    data.display()
                );
                println!(
                    "DPO loss {loss:.6} (beta {beta}), rewards chosen {:.4} rejected {:.4} margin {:.4}, accuracy {:.3}",
                    r.chosen, r.rejected, r.margins, r.accuracies
                );
                return Ok(ExitCode::SUCCESS);
            }
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
            let limit = edgetune::files::DATA_FILE_BYTES;
            let body = edgetune::files::read_text(&text, limit, "a text to score", "; score a part of it")?;
            let s = load(&m, &gpu)?;
            let loss = s.mean_loss(&body)?;
            println!("mean token loss: {loss:.6}");
            println!("perplexity: {:.4}", f64::from(loss).exp());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The answers' table: per record its scores (base, then adapter), then the means.
fn print_answer_report(r: &edgetune::session::AnswerReport, data: &std::path::Path) {
    let n = r.answers.len();
    println!("{n} held-out answers ({}), scored against each record's own answer", data.display());
    let adapter = r.adapter.is_some();
    println!(
        "{:>6}  {:>7} {:>7}  {}question",
        "line",
        "base F1",
        "ROUGE-L",
        if adapter { "adapter F1 ROUGE-L  " } else { "" }
    );
    // The answers on one line each, cut at 100 characters, control characters escaped (a
    // model's output must not drive the terminal).
    let one_line = |t: &str| -> String {
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        let t: String =
            t.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect();
        if t.chars().count() > 100 { format!("{}…", t.chars().take(100).collect::<String>()) } else { t }
    };
    for a in &r.answers {
        let tuned = match a.adapter_scores {
            Some(t) => format!("{:>10.3} {:>7.3}  ", t.f1, t.rouge_l),
            None => String::new(),
        };
        let q: String = a.question.chars().take(60).collect();
        println!("{:>6}  {:>7.3} {:>7.3}  {tuned}{q}", a.line, a.base_scores.f1, a.base_scores.rouge_l);
        println!("{:>8}expected: {}", "", one_line(&a.reference));
        println!("{:>8}base:     {}", "", one_line(&a.base));
        if let Some(t) = &a.adapter {
            println!("{:>8}adapter:  {}", "", one_line(t));
        }
    }
    let line = |who: &str, s: &edgetune::score::AnswerScores| {
        println!("{who}: exact match {:.3}, token F1 {:.3}, ROUGE-L {:.3} (means over {n})", s.exact, s.f1, s.rouge_l)
    };
    line("base   ", &r.base);
    if let Some(t) = &r.adapter {
        line("adapter", t);
    }
}

/// Runs the command line given to this process, printing an error to stderr on failure.
/// `edgetune import`: loads the adapter against the base (which checks every tensor's name and
/// shape) and prints what it holds.
fn import(model: &std::path::Path, adapter: &std::path::Path) -> Result<()> {
    let (cfg, _) = edgetune::model::open_weights(model)?;
    let a = edgetune::lora::load(adapter, &cfg)?;
    let c = &a.config;
    let modules: Vec<String> = {
        let mut m: Vec<String> = a.layout.slots.iter().map(|s| s.module.name().to_string()).collect();
        m.sort();
        m.dedup();
        m
    };
    let layers = a.layout.slots.iter().map(|s| s.layer).collect::<std::collections::BTreeSet<_>>().len();
    // A PEFT folder names the model it was trained on (a path on the machine that trained it).
    let base = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(String::from))
        .unwrap_or_default();
    println!("adapter: {}", adapter.display());
    println!("fits: {} ({}, {} layers)", model.display(), cfg.arch.name(), cfg.num_layers);
    println!("r: {}, alpha: {}, scale: {}{}", c.r, c.alpha, c.scale(), if c.use_rslora { " (rsLoRA)" } else { "" });
    println!(
        "modules: {} in {layers} of {} layers ({} matrices, {} parameters)",
        modules.join(", "),
        cfg.num_layers,
        a.layout.slots.len(),
        a.layout.len
    );
    if !base.is_empty() {
        println!("trained on: {base}");
        // The name is a path or hub id of the machine that trained it: only its last part can
        // be compared with this model's.
        let last = |p: &str| p.trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or("").to_string();
        let here = last(&model.to_string_lossy());
        if last(&base) != here {
            eprintln!(
                "warning: the adapter names {base} as its base, not {here}; its shapes fit this model, but weights \
                 trained on another model give other answers"
            );
        }
    }
    Ok(())
}

pub fn main() -> ExitCode {
    interrupt::exit_quietly_on_closed_pipe();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
