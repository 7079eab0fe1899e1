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
