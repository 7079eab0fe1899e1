//! A Hugging Face folder's hyper-parameters and tensor names as llama.cpp's
//! `convert_hf_to_gguf.py` writes them into a GGUF file (its `TextModel`, `LlamaModel`,
//! `Qwen2Model`, `Qwen3Model`, `Gemma2Model`, `Gemma3Model` and `Phi3MiniModel`), for the
//! families whose files edgetune writes from a folder: Llama (and Mistral, which the converter
//! writes as `llama`), Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 (Phi-3.5-mini, Phi-4-mini), each
//! refused where the converter's file would compute otherwise in llama.cpp than the folder does
//! in transformers.

use std::path::Path;

use serde_json::Value as Json;

use super::config::{
    Arch, ModelConfig, RopeScaling, llama_cpp_query_scale, llama_cpp_window_layers, longrope_attention_factor,
};
use super::gguf::Value;
use crate::error::{Error, Result};

/// Whether edgetune writes a GGUF file for the model of `cfg` read from the folder `dir` (whose
/// `config.json` is `raw`): the families above, each as llama.cpp reads its files. Llama,
/// Mistral, Qwen2 and Qwen3 with no layer attending within a sliding window (llama.cpp's
/// `llama`, `qwen2` and `qwen3` files hold no window, so the converter drops it). Gemma with
/// llama.cpp's query scale (it has no key for `query_pre_attn_scalar`), its pattern of window
/// layers (a window length, no pattern, is written), Gemma 2's tied head, soft caps and one
/// RoPE base of 10000 (its files hold neither base nor scaling), Gemma 3's unscaled
/// window layers and no attention soft cap, and Gemma 2's SentencePiece `tokenizer.model`.
/// Phi-3 with no window shorter than its context (llama.cpp runs phi3 files without one), RoPE
/// unscaled or LongRoPE with the attention factor the converter computes (it reads no other).
fn check_writable(dir: &Path, cfg: &ModelConfig, raw: &Json) -> Result<()> {
    let arch = cfg.arch.gguf_name();
    let windowed = cfg.sliding_window.filter(|_| cfg.window_layers.iter().any(|&b| b));
    let refuse =
        |what: String| Err(Error::unsupported(dir, format!("GGUF file from a {} folder with {what}", cfg.arch.name())));
    if cfg.arch == Arch::Phi3 {
        if let Some(w) = windowed.filter(|&w| w < cfg.max_position_embeddings) {
            return refuse(format!(
                "a sliding window of {w} tokens: llama.cpp runs phi3 files without their window, so it would \
                 attend past it"
            ));
        }
        return match &cfg.rope_scaling {
            None => Ok(()),
            Some(RopeScaling::LongRope { original_max_position, attention_factor, .. }) => {
                let theirs = longrope_attention_factor(cfg.max_position_embeddings, *original_max_position);
                if (attention_factor - theirs).abs() > 1e-6 * theirs {
                    return refuse(format!(
                        "a LongRoPE attention factor of {attention_factor}: llama.cpp's converter writes {theirs}, \
                         from the contexts"
                    ));
                }
                Ok(())
            }
            Some(other) => {
                refuse(format!("RoPE scaling {other:?}: llama.cpp's converter writes only LongRoPE for phi3"))
            }
        };
    }
    let gemma = matches!(cfg.arch, Arch::Gemma2 | Arch::Gemma3);
    if !gemma {
        if let Some(w) = windowed {
            return Err(Error::unsupported(
                dir,
                format!(
                    "GGUF file from a folder whose layers attend within a sliding window of {w} tokens: llama.cpp's \
                     {arch} files hold no window, so llama.cpp would attend past it"
                ),
            ));
        }
        return Ok(());
    }
    let scale = llama_cpp_query_scale(cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim);
    if (cfg.query_scale - scale).abs() > 1e-6 * scale {
        let named = raw.get("query_pre_attn_scalar").map_or_else(|| "none".to_string(), Json::to_string);
        return refuse(format!(
            "query_pre_attn_scalar {named}: llama.cpp's {arch} files scale queries by 1 / sqrt({}) (key_length, \
             or hidden / heads for the 27B), which would change its attention",
            (1.0 / (scale * scale)).round()
        ));
    }
    let pattern = llama_cpp_window_layers(cfg.arch, cfg.num_layers);
    if windowed.is_none() || cfg.window_layers != pattern {
        let list =
            |v: &[bool]| v.iter().enumerate().filter(|(_, b)| **b).map(|(l, _)| l.to_string()).collect::<Vec<_>>();
        return refuse(format!(
            "a sliding window on layers [{}]: llama.cpp's {arch} files window layers [{}]",
            if windowed.is_some() { list(&cfg.window_layers).join(", ") } else { String::new() },
            list(&pattern).join(", ")
        ));
    }
    if cfg.arch == Arch::Gemma2 {
        if !cfg.tie_word_embeddings {
            return refuse(
                "its own lm_head (tie_word_embeddings false): llama.cpp's converter drops Gemma 2's lm_head, so \
                 llama.cpp would use the embeddings"
                    .into(),
            );
        }
        if cfg.attn_softcap.is_none() || cfg.final_softcap.is_none() {
            return refuse(
                "no attn_logit_softcapping or final_logit_softcapping: llama.cpp caps gemma2's scores and logits"
                    .into(),
            );
        }
        if cfg.rope_theta != 10000.0 || cfg.rope_scaling.is_some() || cfg.sliding_rope.is_some() {
            return refuse(format!(
                "RoPE base {} or scaling: llama.cpp's gemma2 files hold neither, so llama.cpp would use a base of 10000",
                cfg.rope_theta
            ));
        }
        if !dir.join("tokenizer.model").is_file() {
            return refuse(
                "no tokenizer.model: llama.cpp's converter writes Gemma 2's SentencePiece vocabulary from it".into(),
            );
        }
    } else {
        if cfg.attn_softcap.is_some() {
            return refuse("attn_logit_softcapping: llama.cpp's gemma3 files have no attention soft cap".into());
        }
        if cfg.sliding_rope.as_ref().is_some_and(|(_, s)| s.is_some()) {
            return refuse(
                "RoPE scaling on its sliding-window layers: llama.cpp's gemma3 scales only the others".into(),
            );
        }
    }
    Ok(())
}

/// The hyper-parameters the converter writes for the folder `dir` (whose `config.json` gave
/// `cfg`), after refusing a folder whose file would not compute as the folder
/// does (see `check_writable`); `general.file_type` and the tokenizer are the caller's.
pub fn hparams(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let cfg_path = dir.join("config.json");
    let raw: Json = serde_json::from_str(&crate::files::read_config(&cfg_path)?)
        .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    check_writable(dir, cfg, &raw)?;
    let arch = cfg.arch.gguf_name();
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v).map(Value::U32).map_err(|_| Error::format(&cfg_path, format!("{what} {v} is past 2^32")))
    };
    let mut out: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
    ];
    let mut key = |k: &str, v: Value| out.push((format!("{arch}.{k}"), v));
    let head_dim = u32_of(cfg.head_dim, "head_dim")?;
    if cfg.arch == Arch::Phi3 {
        // `Phi3MiniModel` writes its own list: the original context (transformers' default
        // 4096 where the config names none), the rotary width, no head width, the window (0
        // for none) and LongRoPE's attention factor.
        let original = match &cfg.rope_scaling {
            Some(RopeScaling::LongRope { original_max_position, attention_factor, .. }) => {
                key("rope.scaling.attn_factor", Value::F32(*attention_factor));
                *original_max_position
            }
            _ => ["rope_parameters", "rope_scaling"]
                .iter()
                .filter_map(|k| raw.get(*k))
                .chain([&raw])
                .find_map(|j| j.get("original_max_position_embeddings").and_then(Json::as_u64))
                .map_or(4096, |v| v as usize),
        };
        key("context_length", u32_of(cfg.max_position_embeddings, "max_position_embeddings")?);
        key("rope.scaling.original_context_length", u32_of(original, "original_max_position_embeddings")?);
        key("embedding_length", u32_of(cfg.hidden_size, "hidden_size")?);
        key("feed_forward_length", u32_of(cfg.intermediate_size, "intermediate_size")?);
        key("block_count", u32_of(cfg.num_layers, "num_hidden_layers")?);
        key("attention.head_count", u32_of(cfg.num_heads, "num_attention_heads")?);
        key("attention.head_count_kv", u32_of(cfg.num_kv_heads, "num_key_value_heads")?);
        key("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps));
        key("rope.dimension_count", u32_of(cfg.rotary_dim, "the rotary width")?);
        key("rope.freq_base", Value::F32(cfg.rope_theta));
        key("attention.sliding_window", u32_of(cfg.sliding_window.unwrap_or_default(), "sliding_window")?);
        out.push(("general.quantization_version".into(), Value::U32(2)));
        return Ok(out);
    }
    // The keys every class writes (`Gemma2Model` in another order, which readers ignore).
    key("block_count", u32_of(cfg.num_layers, "num_hidden_layers")?);
    key("context_length", u32_of(cfg.max_position_embeddings, "max_position_embeddings")?);
    key("embedding_length", u32_of(cfg.hidden_size, "hidden_size")?);
    key("feed_forward_length", u32_of(cfg.intermediate_size, "intermediate_size")?);
    key("attention.head_count", u32_of(cfg.num_heads, "num_attention_heads")?);
    key("attention.head_count_kv", u32_of(cfg.num_kv_heads, "num_key_value_heads")?);
    if cfg.arch == Arch::Gemma2 {
        // `Gemma2Model` writes no RoPE keys; the head's width, the soft caps and the window.
        key("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps));
        key("attention.key_length", head_dim.clone());
        key("attention.value_length", head_dim);
        for (k, v) in [("attn_logit_softcapping", cfg.attn_softcap), ("final_logit_softcapping", cfg.final_softcap)] {
            key(k, Value::F32(v.unwrap_or_default()));
        }
        key("attention.sliding_window", u32_of(cfg.sliding_window.unwrap_or_default(), "sliding_window")?);
        out.push(("general.quantization_version".into(), Value::U32(2)));
        return Ok(out);
    }
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
    if let Some((base, _)) = cfg.sliding_rope.as_ref().filter(|_| cfg.arch == Arch::Gemma3) {
        key("rope.freq_base_swa", Value::F32(*base));
    }
    key("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps));
    // The head's width where config.json names it, as `TextModel` writes it; always for Gemma 3.
    if cfg.arch == Arch::Gemma3 || raw.get("head_dim").is_some_and(|h| !h.is_null()) {
        key("attention.key_length", head_dim.clone());
        key("attention.value_length", head_dim.clone());
    }
    if cfg.arch == Arch::Gemma3 {
        if let Some(cap) = cfg.final_softcap {
            key("final_logit_softcapping", Value::F32(cap));
        }
        key("attention.sliding_window", u32_of(cfg.sliding_window.unwrap_or_default(), "sliding_window")?);
    }
    if arch == "llama" {
        key("vocab_size", u32_of(cfg.vocab_size, "vocab_size")?);
        key("rope.dimension_count", head_dim);
    }
    out.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(out)
}

/// The tensors the converter writes from the configuration, not the weights: Llama 3's
/// `rope_freqs.weight` (see [`llama3_rope_divisors`]) and LongRoPE's factors
/// (`rope_factors_long.weight`, `rope_factors_short.weight`).
pub fn config_tensors(cfg: &ModelConfig) -> Vec<(&'static str, Vec<f32>)> {
    match &cfg.rope_scaling {
        Some(RopeScaling::LongRope { short_factor, long_factor, .. }) => {
            vec![("rope_factors_long.weight", long_factor.clone()), ("rope_factors_short.weight", short_factor.clone())]
        }
        _ => llama3_rope_divisors(cfg).map(|d| ("rope_freqs.weight", d)).into_iter().collect(),
    }
}

/// Llama 3's RoPE scaling as the divisor of each frequency, the `rope_freqs.weight` tensor the
/// converter writes for it (`None` without that scaling; see [`RopeScaling::llama3_divisors`]).
pub fn llama3_rope_divisors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    cfg.rope_scaling.as_ref()?.llama3_divisors(cfg.rope_theta, cfg.head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny fixture's configuration, with the query scale llama.cpp would use, and the error
    /// `hparams` gives after `edit` (`None` when it writes the keys).
    fn refusal(fixture: &str, edit: impl Fn(&mut ModelConfig)) -> Option<String> {
        let dir = crate::files::test_fixtures().join(fixture);
        let (mut cfg, _) = crate::model::open_weights(&dir).expect("fixture");
        cfg.query_scale = llama_cpp_query_scale(cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim);
        edit(&mut cfg);
        hparams(&dir, &cfg).err().map(|e| e.to_string())
    }

    /// Each way a Gemma or Phi-3 folder's GGUF file would compute otherwise in llama.cpp is
    /// refused by name, and the tiny Gemma 3 (its query scale set as llama.cpp's) and Phi-4 are
    /// written.
    #[test]
    fn a_folder_llama_cpp_would_run_otherwise_is_refused_by_name() {
        assert_eq!(refusal("tiny_gemma3", |_| {}), None);
        assert_eq!(refusal("tiny_phi4", |_| {}), None);
        type Edit = Box<dyn Fn(&mut ModelConfig)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("tiny_gemma3", Box::new(|c| c.query_scale = 1.0 / 24f32.sqrt()), "query_pre_attn_scalar 24"),
            ("tiny_gemma3", Box::new(|c| c.window_layers[5] = true), "window layers [0, 1, 2, 3, 4]"),
            ("tiny_gemma3", Box::new(|c| c.sliding_window = None), "a sliding window on layers []"),
            ("tiny_gemma2", Box::new(|c| c.tie_word_embeddings = false), "its own lm_head"),
            ("tiny_gemma3", Box::new(|c| c.attn_softcap = Some(50.0)), "no attention soft cap"),
            (
                "tiny_gemma3",
                Box::new(|c| c.sliding_rope = Some((10000.0, Some(RopeScaling::Linear { factor: 2.0 })))),
                "RoPE scaling on its sliding-window layers",
            ),
            ("tiny_gemma2", Box::new(|c| c.final_softcap = None), "final_logit_softcapping"),
            ("tiny_gemma2", Box::new(|c| c.rope_theta = 500000.0), "RoPE base 500000"),
            ("tiny_gemma2", Box::new(|_| {}), "no tokenizer.model"),
            ("tiny_gemma2", Box::new(|c| c.window_layers = vec![true, true]), "window layers [0]"),
            (
                "tiny_phi3",
                Box::new(|c| (c.sliding_window, c.window_layers) = (Some(64), vec![true, true])),
                "a sliding window of 64 tokens",
            ),
            (
                "tiny_phi4",
                Box::new(|c| {
                    if let Some(RopeScaling::LongRope { attention_factor, .. }) = &mut c.rope_scaling {
                        *attention_factor = 1.0;
                    }
                }),
                "LongRoPE attention factor of 1",
            ),
            ("tiny_phi3", Box::new(|c| c.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 })), "Linear"),
        ];
        for (fixture, edit, expected) in cases {
            let err = refusal(fixture, edit).unwrap_or_else(|| panic!("{fixture}: `{expected}` was written"));
            assert!(err.contains(expected) && err.contains(fixture), "{fixture}: {err}");
        }
    }
}
