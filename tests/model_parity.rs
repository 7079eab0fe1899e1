//! Forward-pass parity with transformers on tiny random Llama, Qwen2 and Qwen3 models (fixtures written
//! by tests/reference/generate.py), on the f32 path and on the NF4 path.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::model::llama::{LoadOptions, Model, Quant};

fn ctx() -> Arc<GpuContext> {
    Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")))
}

fn check(kind: &str, quant: Quant) {
    let fx = Fixture::open(&format!("tiny_{kind}_expected.safetensors"));
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    // transformers keeps embeddings and lm_head in f32; so does this comparison.
    let opts = LoadOptions { quant, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx(), &fixtures().join(format!("tiny_{kind}")), &opts).expect("tiny model loads");
    let (key, loss_key) = match quant {
        Quant::None => ("logits", "loss"),
        // A folder has no GGUF blocks: Gguf holds it as NF4.
        Quant::Nf4 | Quant::Gguf => ("nf4_logits", "nf4_loss"),
    };
    let want = fx.f32(key);
    let got = model.all_logits(&ids).expect("forward");
    // Both sides run f32 with the same weights (NF4 codes are bit-identical to bitsandbytes', so
    // the dequantized weights are too). What differs is summation order inside dot products of
    // length <= 128 and the GPU's exp/rsqrt: a few ulps of values of magnitude ~1-10 after two
    // layers, so 1e-4 relative with a 1e-4 absolute floor for logits near zero.
    assert_close(&format!("{kind} {quant:?} logits"), &got, &want, 1e-4, 1e-4);
    let want_loss: f32 = fx.metadata(loss_key).parse().expect("loss");
    let loss = model.mean_loss(&ids).expect("loss");
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "{kind} {quant:?} loss {loss} vs transformers {want_loss}"
    );
    eprintln!("{kind} {quant:?}: loss {loss} vs transformers {want_loss}");
}

#[test]
fn tiny_llama_f32_logits_match_transformers() {
    check("llama", Quant::None);
}

#[test]
fn tiny_llama_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("llama", Quant::Nf4);
}

#[test]
fn tiny_qwen2_f32_logits_match_transformers() {
    check("qwen2", Quant::None);
}

#[test]
fn tiny_qwen2_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("qwen2", Quant::Nf4);
}

#[test]
fn tiny_qwen3_f32_logits_match_transformers() {
    check("qwen3", Quant::None);
}

#[test]
fn tiny_qwen3_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("qwen3", Quant::Nf4);
}

/// Gemma 3: embeddings scaled by sqrt(hidden), (1 + w) norms before and after attention and the
/// MLP, q/k norms, GeGLU, a query scale of 1 / sqrt(24), five sliding layers with their own RoPE
/// base and a global one with linear RoPE scaling.
#[test]
fn tiny_gemma3_f32_logits_match_transformers() {
    check("gemma3", Quant::None);
}

#[test]
fn tiny_gemma3_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("gemma3", Quant::Nf4);
}

#[test]
fn incremental_decoding_of_gemma3_matches_transformers() {
    decode_matches_full("gemma3");
}

/// Gemma 3 with its own heads of 256 dims (2 query heads, 1 kv head, a query scale of
/// 1 / sqrt(256)), wider than one 128-dim block of the tiled attention kernels: the prompt's
/// logits, and each decoded token's over the cache.
#[test]
fn tiny_gemma3_with_256_dim_heads_f32_logits_match_transformers() {
    check("gemma3_wide", Quant::None);
}

#[test]
fn tiny_gemma3_with_256_dim_heads_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("gemma3_wide", Quant::Nf4);
}

#[test]
fn incremental_decoding_of_gemma3_with_256_dim_heads_matches_transformers() {
    decode_matches_full("gemma3_wide");
}

/// Gemma 3 as its 4B, 12B and 27B are published (`Gemma3ForConditionalGeneration`, model_type
/// `gemma3`): the text model of a multimodal folder, its config nested in `text_config` and
/// its tensors under `language_model.model.` beside a SigLIP vision tower, on text alone.
#[test]
fn tiny_multimodal_gemma3_text_model_f32_logits_match_transformers() {
    check("gemma3_mm", Quant::None);
}

#[test]
fn tiny_multimodal_gemma3_text_model_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("gemma3_mm", Quant::Nf4);
}

/// Gemma 2: Gemma 3's embedding scale, (1 + w) sandwich norms, GeGLU and query scale (1 /
/// sqrt(24)), no q/k norms, the first layer within a window of 4 and the second global, and
/// both soft caps, on the attention scores (1.0) and the logits (1.5), each of which moves
/// these logits by 0.37 and 1.5 (tests/reference/generate.py checks it).
#[test]
fn tiny_gemma2_f32_logits_match_transformers() {
    check("gemma2", Quant::None);
}

#[test]
fn tiny_gemma2_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("gemma2", Quant::Nf4);
}

#[test]
fn incremental_decoding_of_gemma2_matches_transformers() {
    decode_matches_full("gemma2");
}

/// Mistral with a sliding window of 4 keys on sequences of 12 tokens: transformers masks every
/// key more than 3 positions back, on every layer.
#[test]
fn tiny_mistral_sliding_window_logits_match_transformers() {
    check("mistral", Quant::None);
}

#[test]
fn tiny_mistral_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("mistral", Quant::Nf4);
}

/// Phi-3: its fused qkv_proj and gate_up_proj split by rows on load (NF4 blocks of 64 values
/// never straddle two parts, so the codes are bitsandbytes' of the fused matrix).
#[test]
fn tiny_phi3_f32_logits_match_transformers() {
    check("phi3", Quant::None);
}

#[test]
fn tiny_phi3_nf4_logits_match_transformers_on_bnb_dequantized_weights() {
    check("phi3", Quant::Nf4);
}

/// Phi-4-mini's RoPE on a tiny Phi-3: half of each head rotated, LongRoPE's short factors and
/// its attention factor on cos and sin.
#[test]
fn tiny_phi3_with_partial_longrope_logits_match_transformers() {
    check("phi4", Quant::None);
}

#[test]
fn tiny_phi3_with_partial_longrope_nf4_logits_match_transformers() {
    check("phi4", Quant::Nf4);
}

#[test]
fn incremental_decoding_with_the_kv_cache_matches_a_full_forward() {
    decode_matches_full("llama");
}

/// Decoding past the window: each new token sees only the last 4 cached keys.
#[test]
fn incremental_decoding_within_a_sliding_window_matches_transformers() {
    decode_matches_full("mistral");
}

fn decode_matches_full(kind: &str) {
    let fx = Fixture::open(&format!("tiny_{kind}_expected.safetensors"));
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let opts = LoadOptions { quant: Quant::None, ..Default::default() };
    let model = Model::open(ctx(), &fixtures().join(format!("tiny_{kind}")), &opts).expect("load");
    let v = model.config.vocab_size;
    let full = fx.f32("logits");
    let mut cache = model.new_cache().expect("cache");
    let split = 5;
    let first = model.next_logits(&ids[..split], &mut cache).expect("prefill");
    assert_close("prefill last row", &first, &full[(split - 1) * v..split * v], 1e-4, 1e-4);
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = model.next_logits(&[id], &mut cache).expect("decode step");
        assert_close(&format!("decode position {i}"), &step, &full[i * v..(i + 1) * v], 1e-4, 1e-4);
    }
}

/// A prompt longer than `LoadOptions::prefill_chunk` runs in chunks, each attending to what the
/// ones before it put in the cache: the last position's logits, and the tokens decoded after
/// them, are transformers' full forward's, for chunks of 1, 3, 4 (dividing the prompt or not,
/// a last chunk of one token), the prompt less one and the whole prompt, and for Mistral with
/// its sliding window of 4 across the chunks' edges. Each chunk is one submission. A prompt
/// with a token outside the vocabulary in its last chunk, or one past the cache, is refused
/// before any of it runs (the cache stays empty), and a chunk of 0 tokens is refused at load.
#[test]
fn a_long_prompt_runs_in_chunks_and_gives_the_full_forwards_logits() {
    for kind in ["llama", "mistral"] {
        let fx = Fixture::open(&format!("tiny_{kind}_expected.safetensors"));
        let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
        let full = fx.f32("logits");
        let dir = fixtures().join(format!("tiny_{kind}"));
        let prompt = ids.len() - 2;
        for chunk in [1, 3, 4, prompt - 1, prompt] {
            let opts = LoadOptions { quant: Quant::None, prefill_chunk: chunk, ..Default::default() };
            // A context of its own: the submissions counted are this model's.
            let model = Model::open(ctx(), &dir, &opts).expect("load");
            let v = model.config.vocab_size;
            let label = format!("{kind}, {prompt} tokens in chunks of {chunk}");
            let mut cache = model.new_cache().expect("cache");
            let mut bad = ids[..prompt].to_vec();
            bad[prompt - 1] = v as u32;
            let err = model.next_logits(&bad, &mut cache).expect_err("a token outside the vocabulary").to_string();
            assert!(err.contains(&format!("{v} is outside the vocabulary")), "{label}: {err}");
            let long = vec![1u32; cache.capacity + 1];
            let err = model.next_logits(&long, &mut cache).expect_err("past the cache").to_string();
            assert!(err.contains("exceed the context capacity"), "{label}: {err}");
            assert_eq!(cache.len, 0, "{label}: a refused prompt ran");
            let before = model.ctx.counts();
            let last = model.next_logits(&ids[..prompt], &mut cache).expect("prefill");
            let submits = (model.ctx.counts() - before).submits;
            assert_eq!(submits, prompt.div_ceil(chunk) as u64, "{label}: submissions");
            assert_eq!(cache.len, prompt, "{label}: cached");
            assert_close(&format!("{label}: last row"), &last, &full[(prompt - 1) * v..prompt * v], 1e-4, 1e-4);
            for (i, &id) in ids.iter().enumerate().skip(prompt) {
                let step = model.next_logits(&[id], &mut cache).expect("decode step");
                assert_close(&format!("{label}: position {i}"), &step, &full[i * v..(i + 1) * v], 1e-4, 1e-4);
            }
        }
        let opts = LoadOptions { prefill_chunk: 0, ..Default::default() };
        let err = Model::open(ctx(), &dir, &opts).expect_err("a chunk of 0").to_string();
        assert!(err.contains("prefill_chunk") && err.contains("1 to 65535"), "{err}");
    }
}

#[test]
fn f16_tables_change_the_nf4_loss_by_f16_rounding_only() {
    let fx = Fixture::open("tiny_llama_expected.safetensors");
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let dir = fixtures().join("tiny_llama");
    let ctx = ctx();
    let f32_tables =
        Model::open(ctx.clone(), &dir, &LoadOptions { f16_tables: false, ..Default::default() }).expect("load");
    let f16_tables = Model::open(ctx, &dir, &LoadOptions::default()).expect("load");
    assert!(f16_tables.weight_bytes < f32_tables.weight_bytes);
    let (a, b) = (f32_tables.mean_loss(&ids).expect("loss"), f16_tables.mean_loss(&ids).expect("loss"));
    // f16 keeps 11 significant bits: each embedding and lm_head weight moves by at most 2^-11
    // relative, so logits move by about that much of their size (~1 here) and the loss by less
    // than 1e-3; a wrong unpacking order would move it by O(1).
    assert!((a - b).abs() < 1e-3, "f32 tables {a} vs f16 tables {b}");
}

/// The planned weight bytes (`edgetune info`, the memory estimate) are what loading uploads, to
/// the byte, for every architecture and both ways of holding the weights.
#[test]
fn planned_weight_bytes_are_the_uploaded_bytes_for_every_architecture() {
    let ctx = ctx();
    let models = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gemma3_wide", "phi3", "phi4"]
        .map(|k| format!("tiny_{k}"));
    let gguf = [
        "tiny_llama_spm.gguf",
        "tiny_qwen2_bpe.gguf",
        "tiny_gemma2_bpe.gguf",
        "tiny_gemma3_bpe.gguf",
        "tiny_phi3_bpe.gguf",
    ];
    for name in models.iter().map(String::as_str).chain(gguf) {
        for quant in [Quant::None, Quant::Nf4, Quant::Gguf] {
            let opts = LoadOptions { quant, ..Default::default() };
            let (cfg, src) = edgetune::model::open_weights(&fixtures().join(name)).expect("open");
            let planned = Model::planned_weight_bytes(&cfg, &src, &opts);
            let model = Model::load(ctx.clone(), cfg, &src, &opts).expect("load");
            assert_eq!(planned, model.weight_bytes, "{name} {quant:?}");
        }
    }
}

/// Decoding over a cache longer than a slice of split-key attention (`launch::SPLIT_KEYS`
/// keys), in every kernel family: each decoded token's logits equal those of a prefill of the
/// same prefix, which runs attention unsplit (its grid of query workgroups is large). The tiny
/// Llama and Mistral models (the latter's window of 4 keys leaves all slices but the last
/// empty) are read with a context of 1,024. coop16 and half are left out: their prefill multiplies
/// with f16 operands, so their logits and cache differ from f32 by f16 rounding (bounded by their
/// own tests), and they decode with tile128's attention, which runs here.
#[test]
fn decoding_over_a_long_cache_matches_a_prefill_in_every_family() {
    use edgetune::gpu::launch::SPLIT_KEYS;
    for kind in ["llama", "mistral"] {
        let dir = std::env::temp_dir().join(format!("edgetune-long-cache-{kind}-{}", std::process::id()));
        common::copy_files(&fixtures().join(format!("tiny_{kind}")), &dir);
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("JSON");
        config["max_position_embeddings"] = 1024.into();
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
        let mut contexts = vec![ctx()];
        contexts.extend(common::gpus());
        contexts.retain(|c| !common::f16_products(c).f16());
        assert!(contexts.len() >= 2, "portable and tile128 at least");
        let opts = LoadOptions { quant: Quant::None, ..Default::default() };
        for ctx in contexts {
            let family = ctx.report.kernels.family;
            let model = Model::open(ctx, &dir, &opts).expect("load");
            let vocab = model.config.vocab_size;
            let ids: Vec<u32> = (0..SPLIT_KEYS + 44).map(|i| ((i * 37 + 11) % vocab) as u32).collect();
            let start = SPLIT_KEYS + 36;
            let mut cache = model.new_cache().expect("cache");
            model.next_logits(&ids[..start], &mut cache).expect("prefill");
            for n in start + 1..=ids.len() {
                let step = model.next_logits(&ids[n - 1..n], &mut cache).expect("decode step");
                let full = model.next_logits(&ids[..n], &mut model.new_cache().expect("cache")).expect("prefill");
                assert_close(&format!("{kind} {family}: decoded token {n}"), &step, &full, 1e-4, 1e-4);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The tiny `kind` model of the fixtures, read as `LoadOptions::default()` reads it.
fn tiny(kind: &str) -> (Arc<GpuContext>, Model) {
    let ctx = ctx();
    let model = Model::open(ctx.clone(), &fixtures().join(format!("tiny_{kind}")), &LoadOptions::default());
    (ctx, model.expect("tiny model loads"))
}

/// The residual adds ride in the epilogue of each branch's last product (o_proj, down_proj
/// accumulate into the residual stream): a Llama forward records no `add` kernel, while
/// Gemma 2, whose branches pass through a norm after the product, records two a layer. The
/// logits tests above check that the sums are still transformers'.
#[test]
fn residual_adds_ride_in_the_last_product_of_each_branch() {
    use edgetune::gpu::Timer;
    for (kind, adds_per_layer) in [("llama", 0), ("gemma2", 2)] {
        let (ctx, model) = tiny(kind);
        let layers = model.config.num_layers as u64;
        ctx.start_profiling(Timer::WallClock);
        model.all_logits(&[1, 2, 3, 4, 5]).expect("forward");
        let kernels = ctx.stop_profiling().expect("profile");
        let adds = kernels.iter().find(|(name, _)| *name == "add").map_or(0, |(_, t)| t.dispatches);
        assert_eq!(adds, adds_per_layer * layers, "{kind}: {kernels:?}");
        assert!(kernels.iter().any(|(name, _)| name.starts_with("matmul")), "{kind}: the forward was profiled");
    }
}

/// Decoding fuses the RMSNorm before the attention and MLP products and the LM head, and the
/// MLP's gate, into the one-row products that read them: a decoded token records no
/// `rms_norm` (but Gemma 2's two norms after the branches, a layer) and no gate kernel, where
/// a prompt records two norms a layer more, the final one and a gate a layer. The decoding tests above check that its
/// logits are still a prefill's.
#[test]
fn decoding_fuses_the_norms_and_the_gate_into_the_products() {
    use edgetune::gpu::Timer;
    for (kind, after_branches, gate) in [("llama", 0, "silu_mul"), ("gemma2", 2, "gelu_mul")] {
        let (ctx, model) = tiny(kind);
        let layers = model.config.num_layers as u64;
        let mut cache = model.new_cache().expect("cache");
        let counts = |ids: &[u32], cache: &mut edgetune::model::llama::KvCache| {
            ctx.start_profiling(Timer::WallClock);
            model.next_logits(ids, cache).expect("forward");
            let kernels = ctx.stop_profiling().expect("profile");
            let of = |kernel| kernels.iter().find(|(name, _)| *name == kernel).map_or(0, |(_, t)| t.dispatches);
            (of("rms_norm"), of(gate))
        };
        assert_eq!(counts(&[1, 2, 3], &mut cache), ((2 + after_branches) * layers + 1, layers), "{kind}: a prompt");
        assert_eq!(counts(&[4], &mut cache), (after_branches * layers, 0), "{kind}: a decoded token");
    }
}

/// Decoding with an adapter applied (not merged) runs the LoRA A products of the modules that
/// read one input (q, k and v; gate and up) as one product, with the norm fused in as well,
/// and adds each B product in the epilogue of the base product after it: in every family, each
/// decoded token's logits equal those of a prefill of the same prefix with the adapter (both A
/// and B random: a fresh adapter's B is zero), the adapter moves them, and a token records one
/// dispatch more than without it for each adapted input of a layer (4 with every module
/// adapted). A prompt records one more for each adapted input and one for each adapted module
/// (11 a layer where there were 14). coop16 and half are left out for the reason given above.
#[test]
fn decoding_with_an_adapter_matches_a_prefill_with_it_in_every_family() {
    use edgetune::lora::{Adapter, GpuAdapter, LoraConfig, Module};
    let mut contexts = vec![ctx()];
    // Contexts of its own: it counts what the model records on them.
    contexts.extend(common::fresh_gpus().into_iter().map(Arc::new));
    contexts.retain(|c| !common::f16_products(c).f16());
    // Phi-3's q, k and v are parts of one fused module with one A, and so are gate and up.
    for (ctx, kind) in contexts.iter().flat_map(|c| ["llama", "phi3"].map(|k| (c.clone(), k))) {
        let family = ctx.report.kernels.family;
        let dir = fixtures().join(format!("tiny_{kind}"));
        let model = Model::open(ctx.clone(), &dir, &LoadOptions::default()).expect("load");
        let vocab = model.config.vocab_size;
        let mut adapter = Adapter::new(&model.config, LoraConfig { r: 8, ..Default::default() }).expect("adapter");
        adapter.params = common::rand(adapter.params.len(), 17, 0.05);
        let lora = GpuAdapter::upload(&ctx, &adapter);
        let groups: [&[Module]; 4] = [
            &[Module::QProj, Module::KProj, Module::VProj],
            &[Module::OProj],
            &[Module::GateProj, Module::UpProj],
            &[Module::DownProj],
        ];
        let layers = model.config.num_layers;
        let inputs = (0..layers)
            .flat_map(|l| groups.iter().map(move |g| (l, g)))
            .filter(|(l, g)| g.iter().any(|&m| adapter.layout.slot(*l, m).is_some()))
            .count() as u64;
        assert_eq!(inputs, 4 * layers as u64, "the default targets adapt every module");
        let ids: Vec<u32> = (0..12).map(|i| ((i * 37 + 11) % vocab) as u32).collect();
        let mut cache = model.new_cache().expect("cache");
        let mut base = model.new_cache().expect("cache");
        let dispatches = |f: &mut dyn FnMut() -> Vec<f32>| {
            let before = ctx.counts().dispatches;
            (f(), ctx.counts().dispatches - before)
        };
        // A prompt runs one x A^T product for each adapted input too (the A rows of q, k and v
        // gathered into one, gate and up into another); each module's base product sums its B
        // product (its columns of the shared x A^T) with its own. The tiny models' reductions
        // are too short to split.
        let (_, with) =
            dispatches(&mut || model.next_logits_with(&ids[..4], &mut cache, Some(&lora)).expect("prefill"));
        let (_, without) = dispatches(&mut || model.next_logits(&ids[..4], &mut base).expect("prefill"));
        assert_eq!(with - without, inputs, "{kind} {family}: a prompt's dispatches");
        for n in 5..=ids.len() {
            let (step, with) = dispatches(&mut || {
                model.next_logits_with(&ids[n - 1..n], &mut cache, Some(&lora)).expect("decode step")
            });
            let fresh = &mut model.new_cache().expect("cache");
            let full = model.next_logits_with(&ids[..n], fresh, Some(&lora)).expect("prefill");
            assert_close(&format!("{kind} {family}: decoded token {n} with the adapter"), &step, &full, 1e-4, 1e-4);
            let (plain, without) =
                dispatches(&mut || model.next_logits(&ids[n - 1..n], &mut base).expect("decode step"));
            assert_eq!(with - without, inputs, "{kind} {family}: token {n}'s dispatches");
            let moved = step.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(moved > 1e-2, "{kind} {family}: the adapter moved token {n}'s logits by only {moved}");
        }
    }
}

/// Decoding several sequences at once, each with its own adapter (`Model::decode_rows`: the
/// base products over every row, gathered LoRA, each row's attention over its own cache) gives
/// each sequence the logits that decoding it alone with its adapter gives, within the 1e-4 of
/// the decode-versus-prefill test above (the products sum in another order). Four sequences of
/// different lengths (past Mistral's window of 4 and Gemma 3's), two adapters of ranks 4 (every
/// module) and 8 (o and down only) and one row on the base; after three steps a row is dropped
/// and the others are reordered, and the last step decodes one row (whose B products the
/// one-row products take from its table entry). Both sides take the same tokens, the argmax of the
/// one-at-a-time logits. No step creates a buffer, and no bind group but at a new order.
/// The sequences decoded together have caches of just their prompt and new tokens, three in one
/// pool (`Model::new_caches_for`, two behind another's keys) and one alone (`new_cache_for`),
/// their prompts run into them one at a time; a full one is refused. Also refused: a cache of another model, an
/// adapter index past the set, more rows than the decoder takes, adapters of a higher rank than
/// it was made for.
#[test]
fn decoding_several_sequences_at_once_gives_each_the_logits_it_gets_alone() {
    use edgetune::lora::{Adapter, GpuAdapter, GpuAdapterSet, LoraConfig, TargetModules};
    use edgetune::model::llama::{DecodeRow, RowToken};
    for kind in ["llama", "mistral", "qwen3", "gemma2", "gemma3", "phi3"] {
        let (ctx, model) = tiny(kind);
        let moved = |cfg: LoraConfig, seed: u64| {
            let mut a = Adapter::new(&model.config, cfg).expect("adapter");
            let r = a.layout.r;
            for (i, slot) in a.layout.slots.clone().iter().enumerate() {
                let b = common::rand(slot.n_out * r, seed * 100 + i as u64, 0.3);
                a.params[slot.b..slot.b + b.len()].copy_from_slice(&b);
            }
            GpuAdapter::upload(&ctx, &a)
        };
        let every = moved(LoraConfig { r: 4, seed: 1, ..Default::default() }, 1);
        let names = TargetModules::Names(vec!["o_proj".into(), "down_proj".into()]);
        let some = moved(LoraConfig { r: 8, alpha: 4.0, seed: 2, target_modules: names, ..Default::default() }, 2);
        let set = GpuAdapterSet::new(&ctx, &[&every, &some], model.config.num_layers).expect("set");
        let one = [Some(&every), Some(&some)];
        let vocab = model.config.vocab_size;
        let prompts: [Vec<u32>; 4] =
            [7, 1, 11, 3].map(|n| (0..n).map(|i| ((i * 29 + n * 5 + 3) % vocab) as u32).collect());
        let chosen = [Some(0), None, Some(1), Some(0)];
        let (mut alone, mut next) = (Vec::new(), Vec::new());
        // Together, each with a cache of just its prompt and the 6 tokens it decodes: sequence
        // 1's its own, the others' in one pool, 0 and 3 behind another's keys.
        let sizes: Vec<usize> = prompts.iter().map(|p| p.len() + 6).collect();
        let mut pooled = model.new_caches_for(&[sizes[2], sizes[0], sizes[3]]).expect("pool").into_iter();
        let (c2, c0, c3) = (pooled.next().expect("2"), pooled.next().expect("0"), pooled.next().expect("3"));
        let mut together = vec![c0, model.new_cache_for(sizes[1]).expect("cache"), c2, c3];
        for ((p, a), c2) in prompts.iter().zip(chosen).zip(&mut together) {
            let lora = a.and_then(|i| one[i]);
            let mut c1 = model.new_cache().expect("cache");
            let logits = model.next_logits_with(p, &mut c1, lora).expect("prefill");
            model.next_logits_with(p, c2, lora).expect("prefill");
            next.push(edgetune::reference::argmax(&logits));
            alone.push(c1);
        }
        let mut decoder = model.rows_decoder(4, set.max_rank()).expect("decoder");
        let mut order: Vec<usize> = vec![0, 1, 2, 3];
        for step in 0..6 {
            if step == 3 {
                order = vec![3, 0, 2];
            }
            if step == 5 {
                order = vec![0];
            }
            let before = ctx.counts();
            let logits = {
                let mut caches: Vec<Option<&mut edgetune::model::llama::KvCache>> =
                    together.iter_mut().map(Some).collect();
                let mut rows: Vec<DecodeRow<'_>> = order
                    .iter()
                    .map(|&i| DecodeRow {
                        cache: caches[i].take().expect("once"),
                        adapter: chosen[i],
                        token: RowToken::Id(next[i]),
                    })
                    .collect();
                model.decode_rows(&mut decoder, &set, &mut rows).expect("decode rows")
            };
            let made = ctx.counts() - before;
            // A new order pairs caches with other rows' buffers: bind groups for those, once.
            if ![0, 3, 5].contains(&step) {
                assert_eq!((made.buffers, made.bind_groups), (0, 0), "{kind} step {step}: {made:?}");
            }
            assert_eq!(made.buffers, 0, "{kind} step {step}: {made:?}");
            for (row, &i) in order.iter().enumerate() {
                let lora = chosen[i].and_then(|a| one[a]);
                let want = model.next_logits_with(&[next[i]], &mut alone[i], lora).expect("decode alone");
                let got = &logits[row * vocab..(row + 1) * vocab];
                assert_close(&format!("{kind} step {step}: sequence {i} in row {row}"), got, &want, 1e-4, 1e-4);
                next[i] = edgetune::reference::argmax(&want);
                assert_eq!(together[i].len, alone[i].len);
            }
        }
        // Sequence 0's cache is full: a step more is refused, naming it.
        assert_eq!(together[0].len, together[0].capacity, "{kind}");
        let mut full = [DecodeRow { cache: &mut together[0], adapter: None, token: RowToken::Id(1) }];
        let err = model.decode_rows(&mut decoder, &set, &mut full).expect_err("full");
        assert!(err.to_string().contains("row 0: its cache holds its capacity of"), "{kind}: {err}");
        // The adapters must change the logits, or this tests nothing.
        let base = model.next_logits(&prompts[0], &mut model.new_cache().expect("cache")).expect("base");
        let with =
            model.next_logits_with(&prompts[0], &mut model.new_cache().expect("cache"), Some(&every)).expect("lora");
        assert!(base.iter().zip(&with).any(|(a, b)| (a - b).abs() > 1e-2), "{kind}: the adapter changes nothing");
    }
    // Refused, naming what: a cache made by another model, an adapter index past the set, more
    // rows than the decoder takes, and adapters of a higher rank than it was made for.
    let ((ctx, llama), (_, gemma)) = (tiny("llama"), tiny("gemma2"));
    let none = GpuAdapterSet::new(&ctx, &[], llama.config.num_layers).expect("empty set");
    let mut decoder = llama.rows_decoder(2, 1).expect("decoder");
    let (mut own, mut foreign) = (llama.new_cache().expect("cache"), gemma.new_cache().expect("cache"));
    llama.next_logits(&[1, 2], &mut own).expect("prefill");
    let mut refused = |rows: &mut [DecodeRow<'_>], set: &GpuAdapterSet, why: &str| {
        let err = llama.decode_rows(&mut decoder, set, rows).expect_err(why);
        assert!(err.to_string().contains(why), "{err}");
    };
    let mut third = llama.new_cache().expect("cache");
    refused(
        &mut [
            DecodeRow { cache: &mut own, adapter: None, token: RowToken::Id(1) },
            DecodeRow { cache: &mut foreign, adapter: None, token: RowToken::Id(1) },
        ],
        &none,
        "row 1: its KV cache was made by another model",
    );
    refused(
        &mut [DecodeRow { cache: &mut own, adapter: Some(0), token: RowToken::Id(1) }],
        &none,
        "index 0, of 0 resident",
    );
    refused(
        &mut [
            DecodeRow { cache: &mut own, adapter: None, token: RowToken::Id(1) },
            DecodeRow { cache: &mut third, adapter: None, token: RowToken::Id(1) },
            DecodeRow { cache: &mut foreign, adapter: None, token: RowToken::Id(1) },
        ],
        &none,
        "3 sequences; this decoder takes 1 to 2",
    );
    let a =
        GpuAdapter::upload(&ctx, &Adapter::new(&llama.config, LoraConfig { r: 4, ..Default::default() }).expect("a"));
    let four = GpuAdapterSet::new(&ctx, &[&a], llama.config.num_layers).expect("set");
    refused(
        &mut [DecodeRow { cache: &mut own, adapter: Some(0), token: RowToken::Id(1) }],
        &four,
        "rank 4, past the 1",
    );
    assert_eq!(own.len, 2, "a refused step leaves the cache as it was");
}

/// A step over rows whose caches share a pool records what a step over one row records (every
/// product once over all rows, the keys' writing and the attention one dispatch each a layer,
/// one pick), all in one compute pass, and each pool more adds two dispatches a layer: on Llama
/// and on Gemma 3, whose sliding-window layers read their own key ranges. Pooled or not, the
/// picks agree.
#[test]
fn rows_whose_caches_share_a_pool_decode_in_as_many_dispatches_as_one_row() {
    use edgetune::lora::GpuAdapterSet;
    use edgetune::model::llama::{DecodeRow, KvCache, RowToken};
    for kind in ["llama", "gemma3"] {
        let (ctx, model) = tiny(kind);
        let set = GpuAdapterSet::new(&ctx, &[], model.config.num_layers).expect("set");
        let mut decoder = model.rows_decoder(4, 1).expect("decoder");
        let prompts: Vec<Vec<u32>> = [5u32, 9, 2, 7].iter().map(|&n| (1..=n).map(|i| i * 3 + n).collect()).collect();
        let filled = |mut caches: Vec<KvCache>| {
            for (c, p) in caches.iter_mut().zip(&prompts) {
                model.next_logits(p, c).expect("prefill");
            }
            caches
        };
        let mut pooled = filled(model.new_caches_for(&[20; 4]).expect("pool"));
        let mut apart = filled((0..4).map(|_| model.new_cache_for(20).expect("cache")).collect());
        let mut step = |caches: &mut [KvCache]| {
            let mut rows: Vec<DecodeRow<'_>> =
                caches.iter_mut().map(|cache| DecodeRow { cache, adapter: None, token: RowToken::Id(3) }).collect();
            let before = ctx.counts();
            let picked = model.decode_rows_argmax(&mut decoder, &set, &mut rows).expect("decode");
            let made = ctx.counts() - before;
            assert_eq!(made.passes, 1, "{kind}: a step is one compute pass");
            (made.dispatches, picked)
        };
        let (one, _) = step(&mut pooled[..1]);
        let (four, picked) = step(&mut pooled);
        let (four_pools, picked_apart) = step(&mut apart);
        assert_eq!(four, one, "{kind}: four rows of one pool");
        // Each pool more: its keys and values written, and its attention.
        assert_eq!(four_pools, one + 2 * 3 * model.config.num_layers as u64, "{kind}: four rows of four pools");
        assert_eq!(picked[1..], picked_apart[1..], "{kind}");
    }
}

/// A rows step whose rows take what the step before picked for them on the GPU
/// (`RowToken::Picked`, `Model::submit_rows_argmax`) is submitted before the host reads those
/// picks back, and picks what the same steps fed from the host pick (`decode_rows_argmax`):
/// over steps that keep the rows, drop one, reorder them (runs of picks copied apart) and put a
/// row fed from the host between picked ones. A chained step over the rows of the one before
/// creates nothing and is one submission. Refused, leaving the caches as they were: the pick of
/// a row past the last step's, and any pick after a step that read its logits back.
#[test]
fn rows_steps_fed_by_the_last_picks_on_the_gpu_pick_what_steps_fed_by_the_host_pick() {
    use edgetune::lora::GpuAdapterSet;
    use edgetune::model::llama::{DecodeRow, KvCache, RowToken};
    // The sequences each step decodes, in its order: all, all, one dropped, reordered, the
    // dropped one back between two picked rows, the same.
    let steps: [&[usize]; 6] = [&[0, 1, 2, 3], &[0, 1, 2, 3], &[0, 2, 3], &[3, 0, 2], &[3, 1, 0], &[3, 1, 0]];
    // A step's rows: the caches `feed` names, in its order, each with its token.
    fn rows<'c>(caches: &'c mut [KvCache], feed: &[(usize, RowToken)]) -> Vec<DecodeRow<'c>> {
        let mut slots: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
        feed.iter()
            .map(|&(i, token)| DecodeRow { cache: slots[i].take().expect("once"), adapter: None, token })
            .collect()
    }
    for kind in ["llama", "gemma3"] {
        let (ctx, model) = tiny(kind);
        let set = GpuAdapterSet::new(&ctx, &[], model.config.num_layers).expect("set");
        let prompts: Vec<Vec<u32>> = [5u32, 9, 2, 7].iter().map(|&n| (1..=n).map(|i| i * 3 + n).collect()).collect();
        // Caches of one pool holding the prompts, the prompts' picks, and a decoder.
        let start = || {
            let mut caches = model.new_caches_for(&[24; 4]).expect("pool");
            let first: Vec<u32> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(c, p)| model.next_argmax_with(p, c, None).expect("prefill"))
                .collect();
            (caches, first, model.rows_decoder(4, 1).expect("decoder"))
        };
        // Fed from the host: each step's picks read back before the next step.
        let (mut caches, mut next, mut decoder) = start();
        let mut want = Vec::new();
        for seqs in steps {
            let feed: Vec<(usize, RowToken)> = seqs.iter().map(|&i| (i, RowToken::Id(next[i]))).collect();
            let picked = model.decode_rows_argmax(&mut decoder, &set, &mut rows(&mut caches, &feed)).expect("step");
            seqs.iter().zip(&picked).for_each(|(&i, &id)| next[i] = id);
            want.push(picked);
        }
        assert!(
            want.iter().any(|ids| ids.windows(2).any(|w| w[0] != w[1])),
            "{kind}: rows that all pick one token would not show which row took which pick: {want:?}"
        );
        // Chained: each step submitted before the one before is read back.
        let (mut caches, mut next, mut decoder) = start();
        let staging = [ctx.staging("ids", 16), ctx.staging("ids", 16)];
        let (mut got, mut pending) = (Vec::new(), None);
        let mut read = |pending: Option<(edgetune::gpu::PendingRead, &[usize])>, next: &mut Vec<u32>| {
            if let Some((p, seqs)) = pending {
                let ids = ctx.finish_read(p).expect("read");
                seqs.iter().zip(&ids).for_each(|(&i, &id)| next[i] = id);
                got.push(ids);
            }
        };
        for (s, seqs) in steps.into_iter().enumerate() {
            let last: &[usize] = if s == 0 { &[] } else { steps[s - 1] };
            let feed: Vec<(usize, RowToken)> = seqs
                .iter()
                .map(|&i| (i, last.iter().position(|&l| l == i).map_or(RowToken::Id(next[i]), RowToken::Picked)))
                .collect();
            let before = ctx.counts();
            let submitted = model
                .submit_rows_argmax(&mut decoder, &set, &mut rows(&mut caches, &feed), &staging[s % 2])
                .expect("chained step");
            let made = ctx.counts() - before;
            if seqs == last {
                assert_eq!((made.buffers, made.bind_groups, made.submits), (0, 0, 1), "{kind} step {s}: {made:?}");
            }
            read(pending.replace((submitted, seqs)), &mut next);
        }
        read(pending, &mut next);
        assert_eq!(got, want, "{kind}");
        // Refused, the caches as they were: a row past the last step's three, then any pick
        // after a step that read its logits back.
        let lens: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let refused = |caches: &mut [KvCache], decoder: &mut _, picks: usize| {
            let e = model.decode_rows_argmax(decoder, &set, &mut rows(caches, &[(0, RowToken::Picked(picks))]));
            let e = e.expect_err("a pick past the last step's rows").to_string();
            assert!(e.contains(&format!("its row {picks}, and that step picked {picks} rows by argmax")), "{e}");
        };
        refused(&mut caches, &mut decoder, 3);
        assert_eq!(caches.iter().map(|c| c.len).collect::<Vec<_>>(), lens, "{kind}");
        model.decode_rows(&mut decoder, &set, &mut rows(&mut caches, &[(2, RowToken::Id(1))])).expect("logits");
        refused(&mut caches, &mut decoder, 0);
    }
}
