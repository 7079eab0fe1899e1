//! `edgetune bench` and `edgetune bench-train`: throughput, GPU memory and what the GPU layer
//! creates and records per step or token, on a model file or on random weights of a named
//! shape (no model file needed). Text by default, one JSON object with `--json`.

use std::sync::Arc;
use std::time::Instant;

use edgetune::Result;
use edgetune::gpu::{GpuContext, GpuOptions, KernelTime, Timer};
use edgetune::model::llama::{LoadOptions, Model, StepToken};
use edgetune::train::Precision;
use serde_json::{Value, json};

use crate::BenchModel;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// Median and minimum of a list of seconds, in milliseconds.
fn ms_stats(times: &[f64]) -> (f64, f64) {
    let mut v = times.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (median * 1e3, v[0] * 1e3)
}

/// A benchmark's GPU and model, with what its report names them by.
struct Loaded {
    ctx: Arc<GpuContext>,
    model: Model,
    /// The model file, or `random weights (SHAPE)`.
    name: String,
    load_s: f64,
}

/// Opens the GPU and uploads the model (a file, or random weights of a shape).
fn open(m: &BenchModel, gpu: &GpuOptions, max_context: usize) -> Result<Loaded> {
    let ctx = Arc::new(GpuContext::new(gpu)?);
    let load = LoadOptions { quant: m.quant, max_context, ..Default::default() };
    let t = Instant::now();
    let (model, name) = match (&m.random_weights, &m.model) {
        (Some(shape), _) => {
            let (cfg, src) = edgetune::model::open_random(shape, 0)?;
            (Model::load(ctx.clone(), cfg, &src, &load)?, format!("random weights ({shape})"))
        }
        (None, Some(path)) => (Model::open(ctx.clone(), path, &load)?, path.display().to_string()),
        (None, None) => unreachable!("clap requires --model or --random-weights"),
    };
    Ok(Loaded { ctx, model, name, load_s: t.elapsed().as_secs_f64() })
}

/// The fields both benchmarks' JSON objects open with, then `rest`'s.
fn with_header(l: &Loaded, m: &BenchModel, rest: Value) -> Value {
    let r = &l.ctx.report;
    let mut o = json!({
        "adapter": { "name": r.name, "backend": r.backend, "device_type": r.device_type, "driver": r.driver },
        "kernels": r.kernels,
        "shader_checks": r.shader_checks,
        "model": l.name,
        "shape": m.random_weights,
        "quant": format!("{:?}", m.quant),
        "load_s": l.load_s,
    });
    if let (Some(o), Value::Object(rest)) = (o.as_object_mut(), rest) {
        o.extend(rest);
    }
    o
}

pub struct ForwardBench {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub repeat: usize,
    /// A fresh adapter of this rank applied to every pass (0: none).
    pub lora_rank: usize,
    /// Sequences also decoded together, each with its own adapter (1: not measured).
    pub rows: usize,
    /// Profile one more prefill and as many decoded tokens (see [`profile_forward`]).
    pub profile: bool,
}

/// Per-shader totals of profiled work, slowest first, as [`GpuContext::stop_profiling`] gives
/// them.
type Kernels = Vec<(&'static str, KernelTime)>;

/// The shaders of a profile as JSON: time, dispatches and rates of each.
fn kernels_json(kernels: &Kernels) -> Value {
    kernels
        .iter()
        .map(|(name, t)| {
            json!({
                "kernel": name, "seconds": t.seconds, "dispatches": t.dispatches,
                "gflop_per_s": t.gflops(), "gbyte_per_s": t.gbytes_per_s(),
            })
        })
        .collect()
}

/// Prints the 12 slowest shaders of a profile: time and dispatches divided by `per` (1 for a
/// step, the tokens for decoding), share of the whole, and rates.
fn print_kernels(kernels: &Kernels, per: f64) {
    let total: f64 = kernels.iter().map(|(_, t)| t.seconds).sum();
    let rate = |r: Option<f64>, unit: &str| r.map_or(String::new(), |r| format!(", {r:.1} {unit}"));
    for (name, t) in kernels.iter().take(12) {
        println!(
            "    {name:<28} {:>9.3} ms {:>5.1}%  ({} dispatches{}{})",
            t.seconds * 1e3 / per,
            100.0 * t.seconds / total.max(1e-12),
            t.dispatches as f64 / per,
            rate(t.gflops(), "GFLOP/s"),
            rate(t.gbytes_per_s(), "GB/s")
        );
    }
}

fn timer_text(t: Timer) -> &'static str {
    match t {
        Timer::GpuTimestamps => "GPU timestamps",
        Timer::WallClock => "no timestamp queries on this adapter: wall-clock time, every dispatch waited for",
    }
}

/// Profiled work: its wall-clock time and the time of each shader in it.
struct Profiled {
    tokens: usize,
    wall_s: f64,
    kernels: Kernels,
}

impl Profiled {
    /// The time the dispatches themselves took: the sum over the shaders.
    fn kernel_s(&self) -> f64 {
        self.kernels.iter().map(|(_, t)| t.seconds).sum()
    }

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "wall_ms": self.wall_s * 1e3,
            "kernel_ms": self.kernel_s() * 1e3,
            "dispatches": self.kernels.iter().map(|(_, t)| t.dispatches).sum::<u64>(),
            "kernels": kernels_json(&self.kernels),
        })
    }
}

/// One more prefill of `ids` and `decode_tokens` decoded tokens after it, as
/// [`forward`]'s timed runs, with every dispatch timed: which kernels a prompt and a decoded
/// token spend their time in, and (against the wall clock) how much of a token's time is
/// spent outside them (recording, submitting, waiting for the readback).
fn profile_forward(
    model: &Model,
    ids: &[u32],
    decode_tokens: usize,
    lora: Option<&edgetune::lora::GpuAdapter>,
) -> Result<(Timer, Profiled, Profiled)> {
    let ctx = &model.ctx;
    let mut cache = model.new_cache()?;
    let timer = ctx.start_profiling(Timer::GpuTimestamps);
    let t = Instant::now();
    model.next_argmax_with(ids, &mut cache, lora)?;
    let prefill = Profiled { tokens: ids.len(), wall_s: t.elapsed().as_secs_f64(), kernels: ctx.stop_profiling()? };
    // The cache's first one-token pass makes its decoding buffers, unprofiled, as in the
    // timed runs.
    model.next_argmax_with(&ids[..1], &mut cache, lora)?;
    ctx.start_profiling(timer);
    let t = Instant::now();
    for i in 0..decode_tokens {
        model.next_argmax_with(&[ids[i % ids.len()]], &mut cache, lora)?;
    }
    let decode = Profiled { tokens: decode_tokens, wall_s: t.elapsed().as_secs_f64(), kernels: ctx.stop_profiling()? };
    Ok((timer, prefill, decode))
}

/// Decoding `rows` sequences of `prompt` tokens, each with its own adapter of rank `rank`
/// (moved off zero, so that every product runs): `decode_tokens` tokens of each, one sequence
/// after another as [`edgetune::model::llama::Model::next_argmax_with`] decodes one, then all
/// together a step at a time ([`edgetune::model::llama::Model::decode_rows_argmax`], each step's
/// ids read back before the next) and as greedy [`edgetune::infer::generate_rows`] decodes them
/// ([`edgetune::model::llama::Model::submit_rows_argmax`], each step fed by the one before's picks
/// on the GPU), then two steps reading the logits back, as sampling does.
fn rows_decode(
    model: &edgetune::model::llama::Model,
    (rows, rank): (usize, usize),
    prompt: &[u32],
    decode_tokens: usize,
) -> Result<RowsFigures> {
    use edgetune::lora::{Adapter, GpuAdapter, GpuAdapterSet, LoraConfig};
    use edgetune::model::llama::{DecodeRow, KvCache, RowToken};
    let ctx = &model.ctx;
    let adapters = (0..rows)
        .map(|i| {
            let mut a = Adapter::new(&model.config, LoraConfig { r: rank, seed: i as u64, ..Default::default() })?;
            a.params.iter_mut().enumerate().for_each(|(j, v)| *v += 1e-3 * ((j % 5) as f32 - 2.0));
            Ok(GpuAdapter::upload(ctx, &a))
        })
        .collect::<Result<Vec<_>>>()?;
    let set = GpuAdapterSet::new(ctx, &adapters.iter().collect::<Vec<_>>(), model.config.num_layers)?;
    let prefilled = |caches: Vec<KvCache>| -> Result<Vec<_>> {
        let mut out = Vec::with_capacity(caches.len());
        for (i, mut cache) in caches.into_iter().enumerate() {
            let next = model.next_argmax_with(prompt, &mut cache, Some(&adapters[i]))?;
            out.push((cache, next));
        }
        Ok(out)
    };
    // One after another; each cache's first one-token pass (its buffers) before the clock.
    let mut alone = prefilled((0..rows).map(|_| model.new_cache()).collect::<Result<Vec<_>>>()?)?;
    for (i, (cache, next)) in alone.iter_mut().enumerate() {
        *next = model.next_argmax_with(&[*next], cache, Some(&adapters[i]))?;
    }
    let t = Instant::now();
    for _ in 0..decode_tokens {
        for (i, (cache, next)) in alone.iter_mut().enumerate() {
            *next = model.next_argmax_with(&[*next], cache, Some(&adapters[i]))?;
        }
    }
    let alone_s = t.elapsed().as_secs_f64();
    drop(alone);
    // Together: caches in one pool, of the prompt and every token the steps below take, each
    // row's token picked on the GPU.
    let mut together = prefilled(model.new_caches_for(&vec![prompt.len() + 2 * decode_tokens + 3; rows])?)?;
    let mut decoder = model.rows_decoder(rows, set.max_rank())?;
    // A step's rows, each with its adapter and the token the host holds for it or (`picked`)
    // the one the step before picked for it.
    fn batch(together: &mut [(KvCache, u32)], picked: bool) -> Vec<DecodeRow<'_>> {
        let token = |i: usize, next: u32| if picked { RowToken::Picked(i) } else { RowToken::Id(next) };
        together
            .iter_mut()
            .enumerate()
            .map(|(i, (cache, next))| DecodeRow { cache, adapter: Some(i), token: token(i, *next) })
            .collect()
    }
    // A step at a time: each step's ids read back before the next is recorded (the first
    // step, before the clock, makes the decoder's bind groups).
    let mut stepwise = || -> Result<()> {
        let picked = model.decode_rows_argmax(&mut decoder, &set, &mut batch(&mut together, false))?;
        together.iter_mut().zip(picked).for_each(|((_, next), id)| *next = id);
        Ok(())
    };
    stepwise()?;
    let t = Instant::now();
    for _ in 0..decode_tokens {
        stepwise()?;
    }
    let stepwise_s = t.elapsed().as_secs_f64();
    let staging = staging_pair(ctx, 4 * rows as u64);
    let c0 = ctx.counts();
    let t = Instant::now();
    let last = chained(ctx, &staging, decode_tokens, |staging| {
        model.submit_rows_argmax(&mut decoder, &set, &mut batch(&mut together, true), staging)
    })?;
    let together_s = t.elapsed().as_secs_f64();
    together.iter_mut().zip(last).for_each(|((_, next), id)| *next = id);
    let n = (rows * decode_tokens) as f64;
    // Two steps more as sampling runs them (the rows' logits read back), counted with the
    // greedy ones.
    for _ in 0..2 {
        model.decode_rows(&mut decoder, &set, &mut batch(&mut together, false))?;
    }
    let made = ctx.counts() - c0;
    let per_step = |n: u64| n as f64 / (decode_tokens + 2) as f64;
    Ok(RowsFigures {
        alone: n / alone_s,
        together: n / together_s,
        stepwise: n / stepwise_s,
        allocations: per_step(made.buffers + made.bind_groups),
        dispatches: per_step(made.dispatches),
        passes: per_step(made.passes),
    })
}

/// Two staging buffers of `bytes` for [`chained`] steps.
fn staging_pair(ctx: &GpuContext, bytes: u64) -> [wgpu::Buffer; 2] {
    [ctx.staging("bench ids", bytes), ctx.staging("bench ids", bytes)]
}

/// Runs `steps` (at least one) decoding steps as greedy generation runs them: each submitted by
/// `submit`, which reads its ids back into the one of `staging` it is given, before the one
/// before is read back, so that the GPU runs them back to back. Returns the last step's words.
fn chained(
    ctx: &GpuContext,
    staging: &[wgpu::Buffer; 2],
    steps: usize,
    mut submit: impl FnMut(&wgpu::Buffer) -> Result<edgetune::gpu::PendingRead>,
) -> Result<Vec<u32>> {
    let mut pending = submit(&staging[0])?;
    for i in 1..steps {
        let next = submit(&staging[i % 2])?;
        ctx.finish_read(pending)?;
        pending = next;
    }
    ctx.finish_read(pending)
}

/// What [`rows_decode`] measures: tokens per second one sequence after another and together,
/// and what a step of the second creates and records.
struct RowsFigures {
    alone: f64,
    together: f64,
    /// Together, each step read back before the next is recorded.
    stepwise: f64,
    allocations: f64,
    dispatches: f64,
    passes: f64,
}

/// Prefill and decode throughput, GPU memory, and what each decoded token creates.
pub fn forward(m: &BenchModel, gpu: &GpuOptions, b: &ForwardBench) -> Result<()> {
    use edgetune::lora::{Adapter, GpuAdapter, LoraConfig};
    let ForwardBench { prompt_tokens, decode_tokens, repeat, lora_rank, rows, profile } = *b;
    let loaded = open(m, gpu, m.max_context)?;
    let Loaded { ref ctx, ref model, ref name, load_s } = loaded;
    let adapter = match lora_rank {
        0 => None,
        r => Some(Adapter::new(&model.config, LoraConfig { r, alpha: 2.0 * r as f32, ..Default::default() })?),
    };
    let lora = adapter.as_ref().map(|a| GpuAdapter::upload(ctx, a));
    let lora = lora.as_ref();
    let before = ctx.allocated_bytes();
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..prompt_tokens.max(1) as u32).map(|i| (i * 7919 + 13) % v).collect();
    // Warm-up: compiles every pipeline.
    // Prefill and decoding as greedy generation runs them: the forward pass, the logits and
    // the argmax on the GPU, and the token's id read back.
    let mut cache = model.new_cache()?;
    model.next_argmax_with(&ids[..ids.len().min(8)], &mut cache, lora)?;
    model.next_argmax_with(&ids[..1], &mut cache, lora)?;
    let mut peak = ctx.allocated_bytes();
    let mut prefill = Vec::new();
    for _ in 0..repeat.max(1) {
        let mut cache = model.new_cache()?;
        let t = Instant::now();
        model.next_argmax_with(&ids, &mut cache, lora)?;
        prefill.push(t.elapsed().as_secs_f64());
        peak = peak.max(ctx.allocated_bytes());
    }
    let mut cache = model.new_cache()?;
    model.next_argmax_with(&ids, &mut cache, lora)?;
    // The cache's first one-token pass makes its decoding buffers and bind groups; the
    // measured tokens count what each later token costs.
    model.next_argmax_with(&ids[..1], &mut cache, lora)?;
    let c0 = ctx.counts();
    let t = Instant::now();
    for i in 0..decode_tokens {
        model.next_argmax_with(&[ids[i % ids.len()]], &mut cache, lora)?;
    }
    let decode = t.elapsed().as_secs_f64();
    let per = (ctx.counts() - c0, decode_tokens.max(1) as f64);
    // Decoding as greedy generation runs it: each step fed by the last one's pick on the GPU and
    // submitted before that pick is read back, so the GPU runs the steps back to back.
    let chained = if decode_tokens > 0 {
        let mut cache = model.new_cache()?;
        model.next_argmax_with(&ids, &mut cache, lora)?;
        model.next_argmax_with(&ids[..1], &mut cache, lora)?;
        let staging = staging_pair(ctx, 4);
        let t = Instant::now();
        self::chained(ctx, &staging, decode_tokens, |staging| {
            model.submit_argmax(StepToken::Picked, &mut cache, lora, staging)
        })?;
        decode_tokens as f64 / t.elapsed().as_secs_f64()
    } else {
        0.0
    };
    peak = peak.max(ctx.allocated_bytes());
    let (prefill_ms, prefill_best_ms) = ms_stats(&prefill);
    let weights = model.weight_bytes;
    let kv = model.kv_cache_bytes();
    let act = model.activation_bytes(prompt_tokens.min(model.prefill_chunk), 1, lora_rank);
    let runtime = ctx.runtime_bytes();
    let planned = weights + 2 * kv + act + runtime;
    let per_token = |n: u64| n as f64 / per.1;
    // The host's share of a decoded token: waiting for the GPU (its work and the driver's
    // answer), submitting, and the rest of the wall-clock time, recording.
    let ms = |ns: u64| ns as f64 * 1e-6 / per.1;
    let (submit_ms, wait_ms) = (ms(per.0.submit_ns), ms(per.0.wait_ns));
    let record_ms = (decode * 1e3 / per.1 - submit_ms - wait_ms).max(0.0);
    let rows_rank = lora_rank.max(16);
    let together = if rows > 1 && decode_tokens > 0 {
        Some(rows_decode(model, (rows, rows_rank), &ids[..prompt_tokens.clamp(1, 64)], decode_tokens)?)
    } else {
        None
    };
    let profiled = if profile { Some(profile_forward(model, &ids, decode_tokens, lora)?) } else { None };
    if m.json {
        let o = with_header(
            &loaded,
            m,
            json!({
                "prompt_tokens": prompt_tokens,
                "lora_rank": lora_rank,
                "lora_modules": adapter.as_ref().map_or(0, |a| a.layout.slots.len()),
                "split_keys_below": ctx.split_keys_below(),
                "prefill_ms": { "median": prefill_ms, "min": prefill_best_ms },
                "prefill_tokens_per_s": prompt_tokens as f64 * 1e3 / prefill_best_ms,
                "decode_tokens": decode_tokens,
                "decode_tokens_per_s": if decode_tokens > 0 { decode_tokens as f64 / decode } else { 0.0 },
                "decode_chained_tokens_per_s": chained,
                "dispatches_per_token": per_token(per.0.dispatches),
                "allocations_per_token": per_token(per.0.buffers + per.0.bind_groups),
                "buffers_created_per_token": per_token(per.0.buffers),
                "bind_groups_created_per_token": per_token(per.0.bind_groups),
                "submits_per_token": per_token(per.0.submits),
                "compute_passes_per_token": per_token(per.0.passes),
                "host_ms_per_token": { "recording": record_ms, "submitting": submit_ms, "waiting": wait_ms },
                "gpu_memory_bytes": { "planned": planned, "driver": peak, "driver_after_load": before },
                "rows": together.as_ref().map(|r| json!({
                    "sequences": rows,
                    "lora_rank": rows_rank,
                    "alone_tokens_per_s": r.alone,
                    "together_tokens_per_s": r.together,
                    "together_stepwise_tokens_per_s": r.stepwise,
                    "speedup": r.together / r.alone,
                    "allocations_per_step": r.allocations,
                    "dispatches_per_step": r.dispatches,
                    "compute_passes_per_step": r.passes,
                })),
                "profile_timer": profiled.as_ref().map(|p| p.0),
                "profile": profiled.as_ref().map(|(_, prefill, decode)| json!({
                    "prefill": prefill.json(),
                    "decode": decode.json(),
                })),
            }),
        );
        println!("{o}");
        return Ok(());
    }
    println!("{}", ctx.report);
    println!("model: {name} ({:?}), loaded in {load_s:.2} s", m.quant);
    if let Some(a) = &adapter {
        println!("adapter: rank {lora_rank} on {} modules, applied (not merged)", a.layout.slots.len());
    }
    println!(
        "prefill: {prompt_tokens} tokens in {:.3} s = {:.1} tokens/s (best of {repeat})",
        prefill_best_ms / 1e3,
        prompt_tokens as f64 * 1e3 / prefill_best_ms
    );
    if decode_tokens > 0 {
        println!(
            "decode: {decode_tokens} tokens in {decode:.3} s = {:.2} tokens/s ({:.1} ms/token)",
            decode_tokens as f64 / decode,
            decode * 1e3 / decode_tokens as f64
        );
        println!(
            "  per token: {:.0} dispatches in {:.0} compute passes, {:.0} buffers and {:.0} bind groups created, \
             {:.0} submits",
            per_token(per.0.dispatches),
            per_token(per.0.passes),
            per_token(per.0.buffers),
            per_token(per.0.bind_groups),
            per_token(per.0.submits)
        );
        println!(
            "  per token: {record_ms:.3} ms recording, {submit_ms:.3} ms submitting, {wait_ms:.3} ms waiting for the GPU"
        );
        println!(
            "decode, each step submitted before the last one's token is read back (as greedy generation runs): \
             {chained:.2} tokens/s ({:.1} ms/token)",
            1e3 / chained
        );
    }
    if let Some(r) = together {
        println!(
            "{rows} sequences, each with its own adapter (rank {rows_rank}): {:.2} tokens/s one after another, \
             {:.2} tokens/s together ({:.2}x; {:.2} tokens/s with each step read back before the next); a step: \
             {:.0} dispatches in {:.0} compute passes, {} buffers and bind groups created",
            r.alone,
            r.together,
            r.together / r.alone,
            r.stepwise,
            r.dispatches,
            r.passes,
            r.allocations,
        );
    }
    println!(
        "expected GPU memory: weights {} + one KV cache {} + activations {} + runtime {} = {}",
        mib(weights),
        mib(kv),
        mib(act),
        mib(runtime),
        mib(planned)
    );
    println!("  (two KV caches are live at the peak: the benchmark's and the warm-up's)");
    match (before, peak) {
        (Some(b), Some(p)) => println!("driver allocator: {} allocated at peak ({} after loading)", mib(p), mib(b)),
        _ => println!("driver allocator: not reported by this backend"),
    }
    if let Some((timer, prefill, decode)) = profiled {
        println!(
            "profiled prefill of {} tokens ({}): {:.3} ms, {:.3} ms of it in kernels",
            prefill.tokens,
            timer_text(timer),
            prefill.wall_s * 1e3,
            prefill.kernel_s() * 1e3
        );
        print_kernels(&prefill.kernels, 1.0);
        if decode.tokens > 0 {
            let n = decode.tokens as f64;
            println!(
                "profiled decoding, per token of {}: {:.3} ms, {:.3} ms of it in kernels ({:.0} %)",
                decode.tokens,
                decode.wall_s * 1e3 / n,
                decode.kernel_s() * 1e3 / n,
                100.0 * decode.kernel_s() / decode.wall_s.max(1e-12)
            );
            print_kernels(&decode.kernels, n);
        }
    }
    Ok(())
}

pub struct TrainBench {
    pub seq: usize,
    pub rank: usize,
    pub steps: usize,
    /// Gradient checkpointing, per measured mode.
    pub modes: Vec<bool>,
    pub profile: bool,
    pub activations: Precision,
}

/// One training step's times: recording on the CPU, and until the gradient norm is back.
struct StepTime {
    record: f64,
    total: f64,
}

/// Tokens/s, step time, GPU memory and per-step creations of LoRA training steps.
pub fn train(m: &BenchModel, gpu: &GpuOptions, b: &TrainBench) -> Result<()> {
    use edgetune::lora::{Adapter, GpuAdapter, LoraConfig};
    use edgetune::model::training::{Batch, WorkspacePlan};
    use edgetune::train::optimizer::{AdamwConfig, Optimizer};
    let TrainBench { seq, rank, steps, ref modes, profile, activations } = *b;
    let loaded = open(m, gpu, m.max_context.max(seq))?;
    let Loaded { ref ctx, ref model, ref name, load_s } = loaded;
    let cfg = LoraConfig { r: rank, alpha: 2.0 * rank as f32, ..Default::default() };
    let adapter = Adapter::new(&model.config, cfg)?;
    let n = adapter.layout.len;
    let lora = GpuAdapter::upload(ctx, &adapter);
    let mut opt = Optimizer::new(ctx, n, AdamwConfig::default())?;
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..seq as u32).map(|i| (i * 7919 + 13) % v).collect();
    let train = vec![true; seq];
    let batch = Batch::pack([(&ids[..], &train[..])])?;
    let adapter_bytes = (n * 4 * 4) as u64; // parameters, gradients, two AdamW moments
    if !m.json {
        println!("{}", ctx.report);
        println!(
            "model: {name} ({:?}, loaded in {load_s:.2} s), seq {seq}, LoRA r {rank} on all linear layers ({n} parameters)",
            m.quant
        );
        println!("saved activations: {activations}");
    }
    let mut results = Vec::new();
    for &checkpointing in modes {
        let ws = model.workspace(WorkspacePlan { checkpointing, activations, ..WorkspacePlan::new(seq, rank) })?;
        let mut step = |batch: &Batch| -> Result<StepTime> {
            let t = Instant::now();
            let mut enc = ctx.encoder_with(ws.binds());
            opt.zero_grad(&mut enc);
            model.forward_backward(&mut enc, &ws, batch, &lora, &opt.grads, 1.0 / batch.len() as f32)?;
            opt.record_step(ctx, &mut enc, &lora.params, 1e-4)?;
            let cmds = enc.finish();
            let record = t.elapsed().as_secs_f64();
            ctx.submit([cmds]);
            // Waits for the step: the gradient norm is its last result.
            ctx.read_f32(&opt.norm, 1)?;
            Ok(StepTime { record, total: t.elapsed().as_secs_f64() })
        };
        // Warm-up: two tokens compile every pipeline; full steps make what the first steps
        // make, so the timed steps count what every later step costs. One full step is not
        // always enough: where the split-reduction scratch grows in its backward pass, the
        // next step's forward dispatches meet the new scratch and make their bind groups
        // again. So full steps run until one creates nothing (at most four).
        step(&Batch::pack([(&ids[..2], &train[..2])])?)?;
        for _ in 0..4 {
            let before = ctx.counts();
            step(&batch)?;
            let made = ctx.counts() - before;
            if made.buffers + made.bind_groups + made.pipelines == 0 {
                break;
            }
        }
        let c0 = ctx.counts();
        let mut times = Vec::new();
        for _ in 0..steps.max(1) {
            times.push(step(&batch)?);
        }
        let per = ctx.counts() - c0;
        let k = times.len() as f64;
        let peak = ctx.allocated_bytes();
        let (step_ms, best_ms) = ms_stats(&times.iter().map(|t| t.total).collect::<Vec<_>>());
        let (record_ms, _) = ms_stats(&times.iter().map(|t| t.record).collect::<Vec<_>>());
        let runtime = ctx.runtime_bytes();
        let planned = model.weight_bytes + adapter_bytes + ws.bytes + runtime;
        let mut kernels = Vec::new();
        let mut timer = None;
        if profile {
            let t = ctx.start_profiling(Timer::GpuTimestamps);
            let total = step(&batch)?.total;
            kernels = ctx.stop_profiling()?;
            timer = Some(t);
            if !m.json {
                println!("  one profiled step ({}): {total:.2} s", timer_text(t));
            }
        }
        if m.json {
            results.push(json!({
                "checkpointing": checkpointing,
                "tokens_per_s": seq as f64 * 1e3 / best_ms,
                "step_ms": { "median": step_ms, "min": best_ms },
                "cpu_record_ms": record_ms,
                "steps": times.len(),
                "dispatches_per_step": per.dispatches as f64 / k,
                "buffers_created_per_step": per.buffers as f64 / k,
                "bind_groups_created_per_step": per.bind_groups as f64 / k,
                "pipelines_created_per_step": per.pipelines as f64 / k,
                "submits_per_step": per.submits as f64 / k,
                "gpu_memory_bytes": {
                    "planned": planned,
                    "weights": model.weight_bytes,
                    "adapter": adapter_bytes,
                    "workspace": ws.bytes,
                    "runtime": runtime,
                    "driver": peak,
                },
                "profile_timer": timer,
                "profile": kernels_json(&kernels),
            }));
            continue;
        }
        println!(
            "gradient checkpointing {}: {:.1} ms/step (median of {}, best {:.1}), {:.1} tokens/s",
            if checkpointing { "on " } else { "off" },
            step_ms,
            times.len(),
            best_ms,
            seq as f64 * 1e3 / best_ms
        );
        println!(
            "  per step: {:.1} ms recording on the CPU, {} dispatches, {} buffers and {} bind groups created, {} submits",
            record_ms,
            per.dispatches as f64 / k,
            per.buffers as f64 / k,
            per.bind_groups as f64 / k,
            per.submits as f64 / k
        );
        println!(
            "  expected GPU memory: weights {} + adapter, gradients and AdamW moments {} + activations {} + runtime {} = {}",
            mib(model.weight_bytes),
            mib(adapter_bytes),
            mib(ws.bytes),
            mib(runtime),
            mib(planned)
        );
        match peak {
            Some(p) => println!("  driver allocator: {} allocated", mib(p)),
            None => println!("  driver allocator: not reported by this backend"),
        }
        print_kernels(&kernels, 1.0);
    }
    if m.json {
        let o = with_header(
            &loaded,
            m,
            json!({
                "seq": seq,
                "rank": rank,
                "targets": "all linear layers",
                "activations": activations.to_string(),
                "lora_parameters": n,
                "modes": results,
            }),
        );
        println!("{o}");
    }
    Ok(())
}
