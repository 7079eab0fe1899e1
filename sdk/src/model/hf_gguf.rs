//! A Hugging Face folder's hyper-parameters and tensor names as llama.cpp's
//! `convert_hf_to_gguf.py` writes them into a GGUF file (its `TextModel`, `LlamaModel`,
//! `Qwen2Model` and `Qwen3Model`), for the families whose files edgetune writes from a folder:
//! Llama (and Mistral, which the converter writes as `llama`), Qwen2 and Qwen3.

use std::path::Path;

use serde_json::Value as Json;

use super::config::{Arch, ModelConfig, RopeScaling};
use super::gguf::Value;
use crate::error::{Error, Result};

/// Whether edgetune writes a GGUF file for the model of `cfg` read from the folder `dir`: the
/// families above, with no layer attending within a sliding window (llama.cpp's `llama`,
/// `qwen2` and `qwen3` files hold no window, so the converter drops it).
pub fn check_writable(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    if !matches!(cfg.arch, Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3) {
        return Err(Error::unsupported(
            dir,
            format!(
                "GGUF file from a {} folder (edgetune writes them from Llama, Mistral, Qwen2 and Qwen3 folders); \
                 merge to a folder and convert it with llama.cpp's convert_hf_to_gguf.py",
                cfg.arch.name()
            ),
        ));
    }
    if let (Some(w), true) = (cfg.sliding_window, cfg.window_layers.iter().any(|&b| b)) {
        return Err(Error::unsupported(
            dir,
            format!(
                "GGUF file from a folder whose layers attend within a sliding window of {w} tokens: llama.cpp's \
                 {} files hold no window, so llama.cpp would attend past it",
                cfg.arch.gguf_name()
            ),
        ));
    }
    Ok(())
}

/// The hyper-parameters the converter writes for the folder `dir` (whose `config.json` gave
/// `cfg`), in its order; `general.file_type` and the tokenizer are the caller's.
pub fn hparams(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let cfg_path = dir.join("config.json");
    let raw: Json = serde_json::from_str(&crate::files::read_config(&cfg_path)?)
        .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    let arch = cfg.arch.gguf_name();
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v).map(Value::U32).map_err(|_| Error::format(&cfg_path, format!("{what} {v} is past 2^32")))
    };
    let mut out: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
    ];
    let mut key = |k: &str, v: Value| out.push((format!("{arch}.{k}"), v));
    key("block_count", u32_of(cfg.num_layers, "num_hidden_layers")?);
    key("context_length", u32_of(cfg.max_position_embeddings, "max_position_embeddings")?);
    key("embedding_length", u32_of(cfg.hidden_size, "hidden_size")?);
    key("feed_forward_length", u32_of(cfg.intermediate_size, "intermediate_size")?);
    key("attention.head_count", u32_of(cfg.num_heads, "num_attention_heads")?);
    key("attention.head_count_kv", u32_of(cfg.num_kv_heads, "num_key_value_heads")?);
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Llama3 { .. }) => {}
        Some(RopeScaling::Linear { factor }) => {
            key("rope.scaling.type", Value::String("linear".into()));
            key("rope.scaling.factor", Value::F32(*factor));
        }
        Some(other) => {
            return Err(Error::unsupported(
                &cfg_path,
                format!("GGUF file from a folder with RoPE scaling {other:?} (edgetune writes linear and llama3)"),
            ));
        }
    }
    key("rope.freq_base", Value::F32(cfg.rope_theta));
    key("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps));
    // The head's width only where config.json names it, as the converter writes it.
    if raw.get("head_dim").is_some_and(|h| !h.is_null()) {
        key("attention.key_length", u32_of(cfg.head_dim, "head_dim")?);
        key("attention.value_length", u32_of(cfg.head_dim, "head_dim")?);
    }
    if arch == "llama" {
        key("vocab_size", u32_of(cfg.vocab_size, "vocab_size")?);
        key("rope.dimension_count", u32_of(cfg.head_dim, "head_dim")?);
    }
    out.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(out)
}

/// Llama 3's RoPE scaling as the divisor of each frequency, the `rope_freqs.weight` tensor the
/// converter writes for it (`None` without that scaling): 1 for short wavelengths, `factor`
/// for long ones, and between them the divisor that transformers' smooth interpolation makes.
pub fn llama3_rope_divisors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) =
        cfg.rope_scaling
    else {
        return None;
    };
    let (factor, lo, hi, omp) =
        (f64::from(factor), f64::from(low_freq_factor), f64::from(high_freq_factor), f64::from(original_max_position));
    let dim = cfg.head_dim as f64;
    Some(
        (0..cfg.head_dim / 2)
            .map(|i| {
                let freq = 1.0 / f64::from(cfg.rope_theta).powf((2 * i) as f64 / dim);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let d = if wavelen < omp / hi {
                    1.0
                } else if wavelen > omp / lo {
                    factor
                } else {
                    let smooth = (omp / wavelen - lo) / (hi - lo);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                d as f32
            })
            .collect(),
    )
}
