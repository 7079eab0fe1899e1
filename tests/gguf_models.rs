//! Tiny GGUF models written the way llama.cpp's converter writes them (tests/reference/generate.py):
//! a llama with a SentencePiece vocabulary and permuted q/k rows, and a qwen2 with biases and a
//! byte-level BPE vocabulary, with Q4_0/Q4_1/Q8_0/F16/BF16 tensors. Expected ids and logits come
//! from transformers loading the same files.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::model::gguf::GgufFile;
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::tokenizer::Tokenizer;
use serde_json::Value;

fn ctx() -> Arc<GpuContext> {
    Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect()
}

fn check_tokenizer(name: &str) {
    let fx = Fixture::open(&format!("{name}_expected.safetensors"));
    let tok = Tokenizer::from_gguf(&GgufFile::open(fixtures().join(format!("{name}.gguf"))).expect("open"))
        .expect("tokenizer");
    let cases: Value = serde_json::from_str(&fx.metadata("tokenizer")).expect("json");
    for case in cases.as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encode"), ids(&case["ids"]), "{name}: ids of {text:?}");
        assert_eq!(
            tok.encode_prompt(text).expect("encode"),
            ids(&case["ids_with_specials"]),
            "{name}: prompt ids of {text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"])).expect("decode"),
            case["decoded"].as_str().expect("decoded"),
            "{name}: decode of {text:?}"
        );
    }
}

fn check_logits(name: &str) {
    let fx = Fixture::open(&format!("{name}_expected.safetensors"));
    let input: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let path = fixtures().join(format!("{name}.gguf"));
    let model = Model::open(ctx(), &path, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("load");
    // Same dequantized weights on both sides (ggml blocks are dequantized bit-exactly), f32 maths.
    assert_close(&format!("{name} logits"), &model.all_logits(&input).expect("forward"), &fx.f32("logits"), 1e-4, 1e-4);
}

#[test]
fn sentencepiece_vocabulary_from_gguf_matches_transformers() {
    check_tokenizer("tiny_llama_spm");
}

#[test]
fn byte_level_qwen2_vocabulary_from_gguf_matches_transformers() {
    check_tokenizer("tiny_qwen2_bpe");
}

#[test]
fn llama_gguf_with_permuted_qk_matches_transformers() {
    check_logits("tiny_llama_spm");
}

#[test]
fn qwen2_gguf_with_biases_matches_transformers() {
    check_logits("tiny_qwen2_bpe");
}

/// Qwen3's q/k norms (`attn_q_norm`, `attn_k_norm`) and heads wider than hidden / heads
/// (`qwen3.attention.key_length`), against transformers on the file's dequantized tensors.
#[test]
fn qwen3_gguf_with_qk_norms_matches_transformers() {
    check_logits("tiny_qwen3_bpe");
}

/// Gemma 3 as llama.cpp's converter writes it: norms stored as 1 + w, post-attention and
/// post-MLP norms, `gemma3.attention.sliding_window`, linear RoPE scaling for the global layer,
/// and llama.cpp's fixed rules (every sixth layer global, base 10000 on the others, the query
/// scale from key_length).
#[test]
fn gemma3_gguf_matches_transformers() {
    check_logits("tiny_gemma3_bpe");
}

/// Gemma 2 as llama.cpp's converter writes it: norms stored as 1 + w, post-attention and
/// post-MLP norms, `gemma2.attention.sliding_window` on the even layers (llama.cpp's rule),
/// `gemma2.attn_logit_softcapping` and `gemma2.final_logit_softcapping`, and the query scale
/// from key_length.
#[test]
fn gemma2_gguf_with_soft_caps_matches_transformers() {
    check_logits("tiny_gemma2_bpe");
}

/// Phi-3 as llama.cpp's converter writes it: `attn_qkv`, and the fused gate and up projection
/// under `ffn_up`.
#[test]
fn phi3_gguf_with_fused_projections_matches_transformers() {
    check_logits("tiny_phi3_bpe");
}

/// phi3 with Phi-4-mini's RoPE: `rope.dimension_count` below the head width, and the LongRoPE
/// factors as `rope_factors_short` / `rope_factors_long` tensors with `rope.scaling.attn_factor`.
#[test]
fn phi3_gguf_with_partial_longrope_matches_transformers() {
    check_logits("tiny_phi4_bpe");
}

/// A chat template in Qwen3's style (a reversed scan with a namespace, `<think>` blocks split
/// out with split/strip/lstrip, an empty think block on the answer after the last question),
/// from the Hugging Face folder's tokenizer_config.json and from the GGUF file's
/// `tokenizer.chat_template`: each renders every conversation as transformers does.
#[test]
fn qwen3_style_chat_template_renders_as_transformers_renders_it() {
    chat_template_renders_as_transformers("qwen3", 6);
}

/// Gemma's turn markers (`model` for the assistant, the system message inside the first user
/// turn, `| trim`).
#[test]
fn gemma_style_chat_template_renders_as_transformers_renders_it() {
    chat_template_renders_as_transformers("gemma3", 4);
}

fn chat_template_renders_as_transformers(kind: &str, n_cases: usize) {
    use edgetune::tokenizer::Message;
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{kind}_chat_template_expected.json"))).expect("fixture"),
    )
    .expect("JSON");
    let from_dir = Tokenizer::from_hf_dir(&fixtures().join(format!("tiny_{kind}"))).expect("tokenizer");
    let gguf = GgufFile::open(fixtures().join(format!("tiny_{kind}_bpe.gguf"))).expect("open");
    let from_gguf = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    // The folder with its template in chat_template.json instead (as a multimodal model's
    // processor keeps it), none in tokenizer_config.json.
    let dir = std::env::temp_dir().join(format!("edgetune-template-{kind}-{}", std::process::id()));
    common::copy_files(&fixtures().join(format!("tiny_{kind}")), &dir);
    let tc_path = dir.join("tokenizer_config.json");
    let mut tc: Value = serde_json::from_slice(&std::fs::read(&tc_path).expect("read")).expect("JSON");
    let template = tc.as_object_mut().expect("object").remove("chat_template").expect("a template");
    std::fs::write(&tc_path, tc.to_string()).expect("write");
    std::fs::write(dir.join("chat_template.json"), serde_json::json!({ "chat_template": template }).to_string())
        .expect("write");
    let from_json = Tokenizer::from_hf_dir(&dir).expect("tokenizer");
    let cases = cases.as_array().expect("cases");
    assert_eq!(cases.len(), n_cases);
    for case in cases {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| Message::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
            .collect();
        let generation = case["add_generation_prompt"].as_bool().expect("flag");
        let want = case["text"].as_str().expect("text");
        for (source, tok) in [("folder", &from_dir), ("GGUF", &from_gguf), ("chat_template.json", &from_json)] {
            let got = tok.apply_chat_template(&messages, generation).expect("renders");
            assert_eq!(got, want, "{source}: {} messages, generation prompt {generation}", messages.len());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Quant::Gguf` keeps a GGUF's Q4_0 tensors in their own blocks: on a file whose matrices are
/// all Q4_0 (each fixture re-encoded by `merge_gguf` with a zero adapter), the logits and the
/// LoRA gradients equal those of the same file dequantized to f32 (the values are ggml's own, so
/// only summation order differs: 1e-4, as in the f32 parity tests), where NF4's
/// re-quantization moves them further. On llama (q/k rows permuted in the file), gemma2, gemma3
/// and phi3 (the fused qkv_proj in Q4_0) files.
#[test]
fn q4_0_tensors_kept_as_blocks_compute_with_the_files_own_values() {
    use edgetune::quant::gguf_blocks::GgmlType;
    let ctx = ctx();
    let dir = std::env::temp_dir().join(format!("edgetune-q4_0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for name in ["tiny_llama_spm", "tiny_gemma2_bpe", "tiny_gemma3_bpe", "tiny_phi3_bpe"] {
        let source = fixtures().join(format!("{name}.gguf"));
        let (cfg, _) = edgetune::model::open_weights(&source).expect("config");
        let path = dir.join(format!("{name}-q4_0.gguf"));
        common::reencoded_gguf(&source, &path, GgmlType::Q4_0);
        let g = GgufFile::open(&path).expect("open");
        let q4_0 = g.tensors.values().filter(|t| t.ty == GgmlType::Q4_0 && t.name.starts_with("blk.")).count();
        assert!(q4_0 >= 4 * cfg.num_layers, "{name}: {q4_0} Q4_0 matrices");
        let open = |quant| {
            let opts = LoadOptions { quant, f16_tables: false, ..Default::default() };
            Model::open(ctx.clone(), &path, &opts).expect("load")
        };
        let (exact, kept, nf4) = (open(Quant::None), open(Quant::Gguf), open(Quant::Nf4));
        let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % exact.config.vocab_size as u32).collect();
        common::assert_kept_blocks_compute_as_f32(&format!("{name}, Q4_0 kept"), &path, [&exact, &kept, &nf4], &ids);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Embedding and output tables taller than one binding are uploaded in chunks of rows, each
/// read from the file a piece at a time from its own first row: on a device opened to bind
/// 16 KiB, the tiny Llama's 64-wide tables of (at least) 320 rows are five or more chunks in
/// f32 and three or more in f16, read from the fixture's Q8_0 blocks (of 32, decoded from each
/// chunk's first block) and from the same file dequantized to F32. Each model's
/// logits equal, bit for bit, those of the same file on the adapter's own limit, where each
/// table is one chunk: the same kernels over the same rows.
#[test]
fn tables_past_one_binding_load_in_chunks_of_rows_from_stored_values() {
    use edgetune::quant::gguf_blocks::GgmlType;
    let binding = 16 << 10;
    let narrow = Arc::new(
        GpuContext::new(&GpuOptions { max_storage_binding: Some(binding as u64), ..Default::default() }).expect("gpu"),
    );
    let wide = ctx();
    let dir = std::env::temp_dir().join(format!("edgetune-table-chunks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let source = fixtures().join("tiny_llama_spm.gguf");
    let (cfg, _) = edgetune::model::open_weights(&source).expect("config");
    let f32 = dir.join("tiny_llama_spm-f32.gguf");
    common::reencoded_gguf(&source, &f32, GgmlType::F32);
    let table = |path: &std::path::Path| {
        let g = GgufFile::open(path).expect("open");
        g.tensors.get("token_embd.weight").expect("token_embd").ty
    };
    assert_eq!((table(&source), table(&f32)), (GgmlType::Q8_0, GgmlType::F32));
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % cfg.vocab_size as u32).collect();
    for path in [&source, &f32] {
        for f16_tables in [false, true] {
            let rows_a_binding = binding / (cfg.hidden_size * if f16_tables { 2 } else { 4 });
            assert!(cfg.vocab_size > 2 * rows_a_binding, "{} rows in chunks of {rows_a_binding}", cfg.vocab_size);
            let opts = LoadOptions { quant: Quant::Nf4, f16_tables, max_context: 32, ..Default::default() };
            let open = |ctx: &Arc<GpuContext>| Model::open(ctx.clone(), path, &opts).expect("load");
            let (chunked, whole) = (open(&narrow), open(&wide));
            let (got, want) = (chunked.all_logits(&ids).expect("logits"), whole.all_logits(&ids).expect("logits"));
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!("{name}, f16 tables {f16_tables}: logit {i} is {} in chunks, {} whole", got[i], want[i]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
