//! `ModelConfig`: the shape of a Llama-family model, read from a Hugging Face `config.json` or
//! from GGUF metadata. Everything the forward pass needs is here, already validated.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, Value};

/// Supported architectures. SmolLM is a Llama; Mistral is a Llama with a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    /// Llama 2 and 3, SmolLM and their kind.
    Llama,
    /// Mistral (a Llama with a sliding window).
    Mistral,
    /// Qwen2 and Qwen2.5 (a Llama with q/k/v biases).
    Qwen2,
    /// Qwen3, dense (a Llama with an RMSNorm over each head of q and k before RoPE, and heads
    /// that need not add up to the hidden size).
    Qwen3,
    /// Gemma 2: Gemma 3's layout without q/k norms, with soft caps on the attention scores and
    /// the final logits, every other layer (the first, third, ...) within a sliding window, one
    /// RoPE base.
    Gemma2,
    /// Gemma 3, text (`gemma3_text`): embeddings scaled by sqrt(hidden), (1 + w) norms, norms
    /// before and after attention and the MLP, q/k norms, GeGLU, its own query scale, and
    /// sliding-window layers with a RoPE base of their own.
    Gemma3,
    /// Phi-3 (a Llama whose checkpoints fuse q, k and v into `qkv_proj`, and gate and up into
    /// `gate_up_proj`; adapters sit on the fused modules, as PEFT puts them).
    Phi3,
}

/// The gate's activation in the MLP: act(gate) * up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    Silu,
    /// GELU, tanh approximation (GeGLU, `gelu_pytorch_tanh`): Gemma.
    GeluTanh,
}

impl Arch {
    /// The architecture's name as GGUF's `general.architecture` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3_text",
            Arch::Phi3 => "phi3",
        }
    }

    /// `general.architecture` of this family's GGUF files: llama.cpp converts Mistral
    /// checkpoints as `llama`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// Whether llama.cpp's converter permutes the rows of q and k (and of adapters on them)
    /// for this family's GGUF files (see `weights::unpermute_rows`).
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral)
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Llama 3.x style: low frequencies scaled by `factor`, high ones kept, smooth in between.
    Llama3 {
        /// How much the low frequencies are divided by.
        factor: f32,
        /// Wavelengths longer than `original_max_position / low_freq_factor` are scaled fully.
        low_freq_factor: f32,
        /// Wavelengths shorter than `original_max_position / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context the model was pre-trained with.
        original_max_position: f32,
    },
    /// Plain position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor of every frequency.
        factor: f32,
    },
    /// Per-frequency divisors given as a tensor (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
    /// Phi-3.5's and Phi-4-mini's LongRoPE: per-frequency divisors for contexts up to
    /// `original_max_position` (`short_factor`) and past it (`long_factor`), and cos and sin
    /// scaled by `attention_factor`. edgetune runs the short factors and caps the context at
    /// `original_max_position`, where transformers runs them too.
    LongRope {
        /// Divisors up to the original context.
        short_factor: Vec<f32>,
        /// Divisors past it (kept for the merged config; not run).
        long_factor: Vec<f32>,
        /// The context the model was pre-trained with.
        original_max_position: usize,
        /// What cos and sin are multiplied by.
        attention_factor: f32,
    },
}

/// The wavelength of RoPE's frequency `i` of `dim / 2` with base `theta`, as llama.cpp's
/// converter computes it (2π over the frequency), for Llama 3's scaling.
fn llama3_wavelength(theta: f32, i: usize, dim: usize) -> f64 {
    let freq = 1.0 / f64::from(theta).powf((2 * i) as f64 / dim as f64);
    2.0 * std::f64::consts::PI / freq
}

impl RopeScaling {
    /// Llama 3's scaling as the divisor of each of the `dim / 2` frequencies of base `theta`
    /// (`None` for any other scaling): 1 for wavelengths shorter than `original_max_position /
    /// high_freq_factor`, `factor` for those longer than `original_max_position /
    /// low_freq_factor`, and between them the divisor transformers' smooth interpolation makes.
    /// This is the `rope_freqs.weight` tensor llama.cpp's converter writes, computed here in f64
    /// and rounded (the converter's f32 arithmetic agrees within a few roundings).
    pub fn llama3_divisors(&self, theta: f32, dim: usize) -> Option<Vec<f32>> {
        let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = *self else {
            return None;
        };
        let (factor, lo, hi, omp) = (
            f64::from(factor),
            f64::from(low_freq_factor),
            f64::from(high_freq_factor),
            f64::from(original_max_position),
        );
        Some(
            (0..dim / 2)
                .map(|i| {
                    let wavelen = llama3_wavelength(theta, i, dim);
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

    /// Llama 3's scaling recovered from its divisors (a GGUF's `rope_freqs.weight`), so that a
    /// folder written from the file says it in config.json; `None` where no Llama 3 scaling
    /// gives these divisors, or where they leave it undetermined (fewer than two frequencies
    /// between the kept and the fully scaled ones).
    ///
    /// Between those, 1 / divisor = (1 - s) / factor + s with s = (L / wavelength - lo) / (hi -
    /// lo), linear in 1 / wavelength, so two such frequencies give L / (hi - lo) and lo / (hi -
    /// lo). Scaling L, lo and hi together changes no divisor (nor transformers' frequencies,
    /// computed from the same formula), so lo is taken as 1, as every Llama 3 model has it. The
    /// context L is rounded to a whole number of tokens and hi to thousandths, each kept only
    /// where the divisors computed back agree with the given ones within what the converter's
    /// f32 arithmetic moves them: s carries about 4 f32 roundings of terms up to hi / (hi - lo),
    /// and d = 1 / ((1 - s) / factor + s) moves relatively by up to d (1 - 1 / factor) ≤ factor
    /// times the error of s.
    pub fn llama3_from_divisors(divisors: &[f32], theta: f32, dim: usize) -> Option<RopeScaling> {
        if divisors.len() != dim / 2 || divisors.iter().any(|d| !d.is_finite()) {
            return None;
        }
        let factor = divisors.iter().copied().fold(1.0f32, f32::max);
        if factor <= 1.0 {
            return None;
        }
        let f = f64::from(factor);
        // (1 / wavelength, s) of each frequency strictly between the kept and the scaled.
        let band: Vec<(f64, f64)> = (divisors.iter().enumerate())
            .filter(|&(_, &d)| d > 1.0 && d < factor)
            .map(|(i, &d)| {
                let wavelen = llama3_wavelength(theta, i, dim);
                (1.0 / wavelen, (1.0 / f64::from(d) - 1.0 / f) / (1.0 - 1.0 / f))
            })
            .collect();
        let (&(u0, s0), &(u1, s1)) = (band.first()?, band.last()?);
        if band.len() < 2 || u0 == u1 {
            return None;
        }
        let slope = (s1 - s0) / (u1 - u0); // L / (hi - lo)
        let lo_over = slope * u0 - s0; // lo / (hi - lo)
        if !(slope > 0.0 && lo_over > 0.0) {
            return None;
        }
        let (hi, omp) = (1.0 + 1.0 / lo_over, slope / lo_over);
        let candidates = [(omp.round(), (hi * 1000.0).round() / 1000.0), (omp.round(), hi), (omp, hi)];
        candidates.into_iter().filter(|&(_, hi)| hi > 1.0).find_map(|(omp, hi)| {
            let scaling = RopeScaling::Llama3 {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: hi as f32,
                original_max_position: omp as f32,
            };
            let back = scaling.llama3_divisors(theta, dim)?;
            let tol = (4.0 * f * hi / (hi - 1.0) + 1.0) * f64::from(f32::EPSILON);
            let agree = back.iter().zip(divisors).all(|(&a, &b)| f64::from((a - b).abs()) <= tol * f64::from(b));
            agree.then_some(scaling)
        })
    }
}

/// The model's hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key and value heads (fewer than `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Tokens in the embedding table.
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE's base.
    pub rope_theta: f32,
    /// RoPE's frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// The values of each head that RoPE rotates: head_dim, or fewer with a
    /// `partial_rotary_factor` (Phi-4-mini rotates 96 of 128).
    pub rotary_dim: usize,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The output head is the embedding table (no `lm_head.weight` of its own).
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Each head of q and k goes through an RMSNorm of its own weights (`head_dim` of them)
    /// before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The beginning-of-sequence token, if the configuration names one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation (`config.json`'s and `generation_config.json`'s).
    pub eos_token_ids: Vec<u32>,
    /// The sliding attention window (Mistral): a query at position p sees the keys at
    /// positions p - window + 1 ..= p, on the layers `window_layers` marks.
    pub sliding_window: Option<usize>,
    /// Which layers attend within `sliding_window` (one flag a layer; every layer when the
    /// configuration names a window and no `layer_types`).
    pub window_layers: Vec<bool>,
    /// RoPE of the sliding-window layers where it differs from the others' (Gemma 3: base
    /// 10000, unscaled): its base and scaling.
    pub sliding_rope: Option<(f32, Option<RopeScaling>)>,
    /// The gate's activation.
    pub hidden_act: Activation,
    /// What q . k is multiplied by: 1 / sqrt(head_dim), or Gemma's 1 / sqrt(query_pre_attn_scalar).
    pub query_scale: f32,
    /// Gemma 2's soft cap of the attention scores (`attn_logit_softcapping`): each scaled score
    /// s becomes cap · tanh(s / cap) before the softmax. `None` for every other family.
    pub attn_softcap: Option<f32>,
    /// Gemma 2's soft cap of the final logits (`final_logit_softcapping`): each logit x becomes
    /// cap · tanh(x / cap). `None` for every other family.
    pub final_softcap: Option<f32>,
    /// What the embedding rows are multiplied by on the way in (Gemma: sqrt(hidden_size); else 1).
    pub embedding_scale: f32,
    /// Added to every RMSNorm weight (Gemma's norms scale by 1 + w: 1; else 0).
    pub norm_offset: f32,
    /// Norms after attention and after the MLP too, before each is added to the residual stream
    /// (Gemma's `post_attention_layernorm` and `post_feedforward_layernorm`; its pre-MLP norm is
    /// `pre_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// The checkpoint fuses q, k and v into `qkv_proj` and gate and up into `gate_up_proj`
    /// (Phi-3); the model splits them by rows, and adapters sit on the fused modules.
    pub fused_projections: bool,
    /// The text model of a multimodal checkpoint (Gemma 3's 4B, 12B and 27B,
    /// `Gemma3ForConditionalGeneration`): its tensors are stored under `language_model.model.`
    /// beside a vision tower, its PEFT keys under `model.language_model.`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub multimodal: bool,
}

/// The sizes transformers' config classes give a Gemma model whose config.json leaves them out
/// (`Gemma2Config()`, `Gemma3TextConfig()`): a multimodal Gemma 3's `text_config` names only
/// what differs from them.
fn gemma_defaults(arch: Arch) -> Json {
    let (vocab, context) = if arch == Arch::Gemma2 { (256000, 8192) } else { (262208, 131072) };
    serde_json::json!({
        "vocab_size": vocab, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": context,
    })
}

fn field<'a>(j: &'a Json, key: &str) -> Option<&'a Json> {
    j.get(key).filter(|v| !v.is_null())
}

/// The layers llama.cpp's `arch` files attend within their sliding window, when the file has
/// one: gemma2 the even layers (the first, the third, ...), gemma3 all but every sixth, other
/// families every layer.
pub(crate) fn llama_cpp_window_layers(arch: Arch, num_layers: usize) -> Vec<bool> {
    (0..num_layers)
        .map(|l| match arch {
            Arch::Gemma2 => l % 2 == 0,
            Arch::Gemma3 => (l + 1) % 6 != 0,
            _ => true,
        })
        .collect()
}

/// What llama.cpp multiplies q . k by in `arch` files: 1 / sqrt(key_length), except for Gemma's
/// 27B models (gemma3 with 62 layers, gemma2 with 46), 1 / sqrt(hidden / heads).
pub(crate) fn llama_cpp_query_scale(
    arch: Arch,
    num_layers: usize,
    hidden_size: usize,
    num_heads: usize,
    head_dim: usize,
) -> f32 {
    match (arch, num_layers) {
        (Arch::Gemma3, 62) | (Arch::Gemma2, 46) => 1.0 / ((hidden_size / num_heads.max(1)) as f32).sqrt(),
        _ => 1.0 / (head_dim as f32).sqrt(),
    }
}

/// A soft cap (Gemma 2's `attn_logit_softcapping`, `final_logit_softcapping`) read from
/// `key` of a config.json (absent or null: none); anything but a positive number is an error
/// naming the key.
fn softcap_of(path: &Path, key: &str, j: &Json) -> Result<Option<f32>> {
    checked_softcap(path, key, field(j, key).map(|v| v.as_f64().unwrap_or(f64::NAN)))
}

/// [`softcap_of`] for a GGUF metadata value.
fn gguf_softcap(path: &Path, key: &str, v: Option<&Value>) -> Result<Option<f32>> {
    checked_softcap(path, key, v.map(|v| v.as_f64().unwrap_or(f64::NAN)))
}

fn checked_softcap(path: &Path, key: &str, v: Option<f64>) -> Result<Option<f32>> {
    match v {
        None => Ok(None),
        Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
        Some(c) => Err(Error::format(path, format!("`{key}` is {c}; expected a positive number"))),
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let j: Json = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        Self::from_hf_value(path, j)
    }

    /// [`from_hf_json`](Self::from_hf_json) of parsed JSON.
    fn from_hf_value(path: &Path, mut j: Json) -> Result<Self> {
        // Gemma's sizes where config.json leaves them out, as transformers gives them.
        let gemma_arch = match field(&j, "model_type").and_then(Json::as_str) {
            Some("gemma2") => Some(Arch::Gemma2),
            Some("gemma3_text") => Some(Arch::Gemma3),
            _ => None,
        };
        if let (Some(arch), Some(obj)) = (gemma_arch, j.as_object_mut()) {
            for (k, v) in gemma_defaults(arch).as_object().into_iter().flatten() {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let j = j;
        let usize_of = |key: &str| -> Result<usize> {
            field(&j, key)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(path, format!("field `{key}` is missing or not a positive integer")))
        };
        let model_type = field(&j, "model_type").and_then(Json::as_str).unwrap_or("");
        let archs: Vec<&str> = field(&j, "architectures")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        let arch = match model_type {
            "llama" | "smollm" | "smollm2" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3,
            "gemma2" => Arch::Gemma2,
            "phi3" => Arch::Phi3,
            "gemma3" => {
                // The text model of a multimodal Gemma 3: its `text_config` (with the top level's
                // head tying and EOS where it names none), trained on text alone.
                let Some(text) = field(&j, "text_config").and_then(Json::as_object) else {
                    return Err(Error::format(
                        path,
                        "model_type `gemma3` without a `text_config` object (a multimodal Gemma 3 names its text \
                         model there)",
                    ));
                };
                let mut merged = text.clone();
                merged.insert("model_type".into(), Json::String("gemma3_text".into()));
                for k in ["tie_word_embeddings", "eos_token_id"] {
                    if let (None, Some(v)) = (merged.get(k), field(&j, k)) {
                        merged.insert(k.into(), v.clone());
                    }
                }
                let mut cfg = Self::from_hf_value(path, Json::Object(merged))?;
                cfg.multimodal = true;
                return Ok(cfg);
            }
            "gemma" => {
                return Err(Error::unsupported(
                    path,
                    "architecture `gemma` (model_type): Gemma 1 is not supported; Gemma 2 and Gemma 3 text models are",
                ));
            }
            "qwen3_moe" => {
                return Err(Error::unsupported(
                    path,
                    "Qwen3's mixture-of-experts models (model_type `qwen3_moe`); edgetune trains dense Qwen3",
                ));
            }
            "" if archs.iter().any(|a| a.starts_with("Llama")) => Arch::Llama,
            other => {
                let name = if other.is_empty() { archs.join(",") } else { other.to_string() };
                return Err(Error::unsupported(
                    path,
                    format!(
                        "architecture `{name}` (model_type); edgetune supports llama, mistral, qwen2, qwen3, \
                         gemma2, gemma3_text, phi3"
                    ),
                ));
            }
        };
        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let num_kv_heads = field(&j, "num_key_value_heads").and_then(Json::as_u64).map_or(num_heads, |v| v as usize);
        // Where config.json leaves a key out, transformers' Gemma config classes give their own
        // defaults: heads 256 wide, a window of 4096, Gemma 3's RoPE base of 1,000,000 and Gemma
        // 2's soft caps of 50 (scores) and 30 (logits); a key given as null stays none.
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        let absent = |key: &str| gemma && j.get(key).is_none();
        let head_dim = field(&j, "head_dim")
            .and_then(Json::as_u64)
            .map_or(if absent("head_dim") { 256 } else { hidden_size / num_heads.max(1) }, |v| v as usize);
        // transformers 5 may nest rope_theta and the scaling inside `rope_parameters`, and for
        // models whose layer types differ (Gemma 3), one set per type.
        let rope_params = field(&j, "rope_parameters");
        let (full_rope, sliding_rope_json) = match rope_params.and_then(|r| field(r, "full_attention")) {
            Some(full) => (Some(full), rope_params.and_then(|r| field(r, "sliding_attention"))),
            None => (rope_params, None),
        };
        let rope_theta = field(&j, "rope_theta")
            .or_else(|| full_rope.and_then(|r| field(r, "rope_theta")))
            .and_then(Json::as_f64)
            .unwrap_or(if arch == Arch::Gemma3 { 1_000_000.0 } else { 10000.0 }) as f32;
        let scaling_json = field(&j, "rope_scaling").or(full_rope);
        let max_position_embeddings =
            field(&j, "max_position_embeddings").and_then(Json::as_u64).unwrap_or(4096) as usize;
        let rope_scaling = match scaling_json {
            Some(s) if rope_type(s) == "longrope" => Some(parse_longrope(path, &j, s, max_position_embeddings)?),
            Some(s) => parse_hf_rope_scaling(path, s)?,
            None => None,
        };
        let sliding_rope = match sliding_rope_json {
            Some(s) => Some((
                field(s, "rope_theta").and_then(Json::as_f64).unwrap_or(10000.0) as f32,
                parse_hf_rope_scaling(path, s)?,
            )),
            // transformers 4's Gemma 3 configs: `rope_local_base_freq`, unscaled; without it
            // (in either version) transformers' default, 10000.
            None => match field(&j, "rope_local_base_freq").and_then(Json::as_f64) {
                Some(b) => Some((b as f32, None)),
                None if arch == Arch::Gemma3 => Some((10000.0, None)),
                None => None,
            },
        };
        let partial_rotary = field(&j, "partial_rotary_factor")
            .or_else(|| full_rope.and_then(|r| field(r, "partial_rotary_factor")))
            .and_then(Json::as_f64)
            .unwrap_or(1.0);
        // As transformers: int(head_dim * partial_rotary_factor).
        let rotary_dim = (head_dim as f64 * partial_rotary) as usize;
        if field(&j, "use_bidirectional_attention").and_then(Json::as_bool) == Some(true) {
            return Err(Error::unsupported(
                path,
                "`use_bidirectional_attention: true` (an embedding model, not a causal language model)",
            ));
        }
        let hidden_act = match field(&j, "hidden_activation").or_else(|| field(&j, "hidden_act")).and_then(Json::as_str)
        {
            None if gemma => Activation::GeluTanh,
            None | Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(Error::unsupported(
                    path,
                    format!("activation `{other}`; edgetune supports silu and gelu_pytorch_tanh"),
                ));
            }
        };
        let query_scale = match field(&j, "query_pre_attn_scalar").and_then(Json::as_f64) {
            Some(s) if gemma => (1.0 / s.sqrt()) as f32,
            None if gemma => 1.0 / 16.0, // transformers' default query_pre_attn_scalar, 256
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let eos_token_ids = match field(&j, "eos_token_id") {
            Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        let num_layers = layer_count(path, "num_hidden_layers", usize_of("num_hidden_layers")?)?;
        // Qwen2 and Qwen3 configs name a window that `use_sliding_window: false` turns off.
        let sliding_window = match field(&j, "use_sliding_window").and_then(Json::as_bool) {
            Some(false) => None,
            _ if absent("sliding_window") => Some(4096),
            _ => field(&j, "sliding_window").and_then(Json::as_u64).map(|v| v as usize),
        };
        let window_layers = hf_window_layers(path, &j, arch, num_layers, sliding_window.is_some())?;
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_of("vocab_size")?,
            rms_norm_eps: field(&j, "rms_norm_eps").and_then(Json::as_f64).unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rotary_dim,
            max_position_embeddings,
            // Gemma ties its head to the embeddings unless it says otherwise.
            tie_word_embeddings: field(&j, "tie_word_embeddings").and_then(Json::as_bool).unwrap_or(gemma),
            qkv_bias: arch == Arch::Qwen2 || field(&j, "attention_bias").and_then(Json::as_bool).unwrap_or(false),
            bos_token_id: field(&j, "bos_token_id").and_then(Json::as_u64).map(|v| v as u32),
            eos_token_ids,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            sliding_window,
            window_layers,
            sliding_rope,
            hidden_act,
            query_scale,
            attn_softcap: match arch == Arch::Gemma2 && absent("attn_logit_softcapping") {
                true => Some(50.0),
                false => softcap_of(path, "attn_logit_softcapping", &j)?,
            },
            final_softcap: match arch == Arch::Gemma2 && absent("final_logit_softcapping") {
                true => Some(30.0),
                false => softcap_of(path, "final_logit_softcapping", &j)?,
            },
            embedding_scale: if gemma { (hidden_size as f64).sqrt() as f32 } else { 1.0 },
            norm_offset: if gemma { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            fused_projections: arch == Arch::Phi3,
            multimodal: false,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the hyper-parameters from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path.as_path();
        let arch_name = g.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            "qwen3moe" => {
                return Err(Error::unsupported(
                    path,
                    "Qwen3's mixture-of-experts models (general.architecture `qwen3moe`); edgetune trains dense Qwen3",
                ));
            }
            other => {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "architecture `{other}` (general.architecture); edgetune reads llama, qwen2, qwen3, gemma2, \
                         gemma3 and phi3 GGUF files"
                    ),
                ));
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads =
            g.get(&key("attention.head_count_kv")).and_then(Value::as_u64).map_or(num_heads, |v| v as usize);
        let head_dim = g
            .get(&key("attention.key_length"))
            .and_then(Value::as_u64)
            .map_or(hidden_size / num_heads.max(1), |v| v as usize);
        // Fewer than head_dim with partial RoPE (phi3 files of Phi-4-mini).
        let rotary_dim = g.get(&key("rope.dimension_count")).and_then(Value::as_u64).map_or(head_dim, |v| v as usize);
        let vocab_size = match g.get(&key("vocab_size")).and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => g.tensors.get("token_embd.weight").map(|t| t.dims[1]).ok_or_else(|| {
                    Error::format(path, "cannot tell the vocabulary size: no `vocab_size`, tokens or token_embd.weight")
                })?,
            },
        };
        let mut rope_scaling = None;
        if let Some(t) = g.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            let factor = g.get(&key("rope.scaling.factor")).and_then(Value::as_f64).unwrap_or(1.0) as f32;
            rope_scaling = match t {
                "none" => None,
                "linear" => Some(RopeScaling::Linear { factor }),
                other => {
                    return Err(Error::unsupported(
                        path,
                        format!("rope scaling `{other}` ({arch_name}.rope.scaling.type)"),
                    ));
                }
            };
        }
        if g.tensors.contains_key("rope_freqs.weight") {
            let (f, _) = g.tensor_f32("rope_freqs.weight")?;
            rope_scaling = Some(RopeScaling::Factors(f));
        }
        // llama.cpp's phi3 LongRoPE: the factors as tensors, the attention factor as a key.
        if g.tensors.contains_key("rope_factors_short.weight") {
            let (short_factor, _) = g.tensor_f32("rope_factors_short.weight")?;
            let (long_factor, _) = g.tensor_f32("rope_factors_long.weight")?;
            let original_max_position =
                g.get(&key("rope.scaling.original_context_length")).and_then(Value::as_u64).ok_or_else(|| {
                    Error::format(path, format!("rope factors but no {arch_name}.rope.scaling.original_context_length"))
                })? as usize;
            let context = u("context_length").unwrap_or(original_max_position);
            let attention_factor = match g.get(&key("rope.scaling.attn_factor")).and_then(Value::as_f64) {
                Some(a) => a as f32,
                None => longrope_attention_factor(context, original_max_position),
            };
            rope_scaling =
                Some(RopeScaling::LongRope { short_factor, long_factor, original_max_position, attention_factor });
        }
        let eos = g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).map(|v| v as u32);
        let num_layers = layer_count(path, &key("block_count"), u("block_count")?)?;
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        let rope_theta = g.get(&key("rope.freq_base")).and_then(Value::as_f64).unwrap_or(10000.0) as f32;
        // As llama.cpp reads gemma3 files: every sixth layer attends to everything, the others
        // within `attention.sliding_window` with an unscaled RoPE base of `rope.freq_base_swa`
        // (10000 without it); the query scale is 1 / sqrt(key_length), except for the 27B
        // (62 layers), where it is 1 / sqrt(hidden / heads). gemma2: the even layers (the
        // first, the third, ...) within the window, with the others' RoPE base unless
        // `rope.freq_base_swa` gives one; the query scale likewise, its 27B having 46 layers.
        // phi3: `attention.sliding_window` on every layer, as llama.cpp reads it.
        let sliding_window = match arch {
            // A window of 0 is none (the converter writes 0 for a Phi-3 config without one).
            Arch::Gemma2 | Arch::Gemma3 | Arch::Phi3 => {
                g.get(&key("attention.sliding_window")).and_then(Value::as_u64).filter(|&v| v > 0).map(|v| v as usize)
            }
            _ => None,
        };
        let window_layers = match sliding_window {
            Some(_) => llama_cpp_window_layers(arch, num_layers),
            None => vec![false; num_layers],
        };
        let query_scale = llama_cpp_query_scale(arch, num_layers, hidden_size, num_heads, head_dim);
        // The sliding-window layers' RoPE base, where the file gives one (gemma3 defaults to
        // 10000, gemma2 to the others' base).
        let swa_base = g.get(&key("rope.freq_base_swa")).and_then(Value::as_f64).map(|b| b as f32);
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: g.get(&key("attention.layer_norm_rms_epsilon")).and_then(Value::as_f64).unwrap_or(1e-6)
                as f32,
            rope_theta,
            rope_scaling,
            rotary_dim,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            bos_token_id: g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids: eos.into_iter().collect(),
            sliding_window,
            window_layers,
            sliding_rope: match (arch, swa_base) {
                (Arch::Gemma3, b) => Some((b.unwrap_or(10000.0), None)),
                (_, Some(b)) if b != rope_theta => Some((b, None)),
                _ => None,
            },
            hidden_act: if gemma { Activation::GeluTanh } else { Activation::Silu },
            query_scale,
            attn_softcap: gguf_softcap(path, &key("attn_logit_softcapping"), g.get(&key("attn_logit_softcapping")))?,
            final_softcap: gguf_softcap(path, &key("final_logit_softcapping"), g.get(&key("final_logit_softcapping")))?,
            embedding_scale: if gemma { (hidden_size as f64).sqrt() as f32 } else { 1.0 },
            norm_offset: if gemma { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            fused_projections: arch == Arch::Phi3,
            multimodal: false,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The Hugging Face name of the norm before the MLP: Llama's `post_attention_layernorm`,
    /// Gemma's `pre_feedforward_layernorm` (its `post_attention_layernorm` follows attention).
    pub fn mlp_norm_name(&self) -> &'static str {
        if self.sandwich_norms { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }
    }

    /// The attention window of layer `l`, if it has one.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.window_layers.get(l).copied().unwrap_or(false))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let mut problems = Vec::new();
        if self.sliding_window == Some(0) {
            problems.push("sliding_window is 0".to_string());
        }
        // Upper bounds far above any real model (the largest open models have hidden sizes near
        // 16,384, intermediate sizes near 53,248, 126 layers, 128 heads and vocabularies of
        // 256,000), so that a broken or crafted file is refused before any size is computed from
        // it, and every product of these sizes fits 64 bits.
        for (name, v, most) in [
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_hidden_layers", self.num_layers, MOST_LAYERS),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("num_key_value_heads", self.num_kv_heads, 1 << 12),
            ("head_dim", self.head_dim, 256),
            ("vocab_size", self.vocab_size, 1 << 23),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ] {
            if v == 0 {
                problems.push(format!("{name} is 0"));
            } else if v > most {
                problems.push(format!("{name} {v} is more than {most}, the most edgetune accepts"));
            }
        }
        if self.num_kv_heads != 0 && !self.num_heads.is_multiple_of(self.num_kv_heads) {
            problems.push(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            problems.push(format!("head_dim {} is odd; RoPE needs pairs", self.head_dim));
        }
        if self.rotary_dim == 0 || self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2) {
            problems.push(format!(
                "RoPE would rotate {} of each head's {} values (partial_rotary_factor); expected an even number \
                 from 2 to head_dim",
                self.rotary_dim, self.head_dim
            ));
        }
        let want = self.rotary_dim / 2;
        match &self.rope_scaling {
            Some(RopeScaling::LongRope { short_factor, long_factor, .. })
                if short_factor.len() != want || long_factor.len() != want =>
            {
                problems.push(format!(
                    "longrope has {} short and {} long factors; {want} expected (one a rotated pair)",
                    short_factor.len(),
                    long_factor.len()
                ))
            }
            Some(RopeScaling::Factors(f)) if f.len() != want => {
                problems.push(format!("{} RoPE factors; {want} expected (one a rotated pair)", f.len()))
            }
            _ => {}
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::format(path, problems.join("; "))) }
    }

    /// Adds the end-of-sequence ids a `generation_config.json` lists (chat models often stop on
    /// more than one token).
    pub fn merge_generation_config(&mut self, path: &Path, text: &str) -> Result<()> {
        let j: Json = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let ids: Vec<u32> = match field(&j, "eos_token_id") {
            Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// Inverse RoPE frequencies (`head_dim / 2` values) with any scaling applied, as
    /// transformers computes them.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.inv_freq(self.rope_theta, self.rope_scaling.as_ref())
    }

    /// What RoPE's cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    pub fn rope_attention_factor(&self) -> f32 {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope { attention_factor, .. }) => *attention_factor,
            _ => 1.0,
        }
    }

    /// The context a model opened with `requested` positions holds: within the model's
    /// positions and the RoPE's ([`ModelConfig::rope_context`]), at least 1.
    pub fn usable_context(&self, requested: usize) -> usize {
        requested.min(self.max_position_embeddings).min(self.rope_context()).max(1)
    }

    /// The longest context the RoPE runs as transformers does: LongRoPE's original context
    /// (beyond it transformers switches to the long factors), else the model's.
    pub fn rope_context(&self) -> usize {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope { original_max_position, .. }) => *original_max_position,
            _ => self.max_position_embeddings,
        }
    }

    /// [`ModelConfig::rope_inv_freq`] of the sliding-window layers, where their RoPE differs.
    pub fn sliding_rope_inv_freq(&self) -> Option<Vec<f32>> {
        self.sliding_rope.as_ref().map(|(theta, scaling)| self.inv_freq(*theta, scaling.as_ref()))
    }

    fn inv_freq(&self, theta: f32, scaling: Option<&RopeScaling>) -> Vec<f32> {
        let (half, dim) = (self.rotary_dim / 2, self.rotary_dim as f64);
        let base: Vec<f64> = (0..half).map(|i| 1.0 / f64::from(theta).powf((2 * i) as f64 / dim)).collect();
        let scaled: Vec<f64> = match scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / f64::from(*factor)).collect(),
            Some(RopeScaling::Factors(fs) | RopeScaling::LongRope { short_factor: fs, .. }) => {
                base.iter().zip(fs).map(|(f, d)| f / f64::from(*d)).collect()
            }
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) => {
                let (factor, lo, hi, omp) = (
                    f64::from(*factor),
                    f64::from(*low_freq_factor),
                    f64::from(*high_freq_factor),
                    f64::from(*original_max_position),
                );
                let low_wavelen = omp / lo;
                let high_wavelen = omp / hi;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (omp / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|v| v as f32).collect()
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = h * self.num_heads * hd;
        let kv = 2 * h * self.num_kv_heads * hd;
        let o = self.num_heads * hd * h;
        let bias = if self.qkv_bias { (self.num_heads + 2 * self.num_kv_heads) * hd } else { 0 };
        let qk_norm = if self.qk_norm { 2 * hd } else { 0 };
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let layer = q + kv + o + bias + qk_norm + 3 * h * i + norms;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_layers * layer + emb + h
    }
}

/// The most layers edgetune accepts (the deepest open models have 126).
const MOST_LAYERS: usize = 1 << 12;

/// A layer count checked as soon as it is read, because per-layer tables (which layers slide)
/// are sized from it before the rest of the config is validated.
fn layer_count(path: &Path, name: &str, n: usize) -> Result<usize> {
    if n > MOST_LAYERS {
        return Err(Error::format(path, format!("{name} {n} is more than {MOST_LAYERS}, the most edgetune accepts")));
    }
    Ok(n)
}

/// Which layers use the sliding window: `layer_types` where the config lists them; else
/// Qwen2's and Qwen3's rule (layers from `max_window_layers` on); else every layer.
fn hf_window_layers(path: &Path, j: &Json, arch: Arch, n: usize, windowed: bool) -> Result<Vec<bool>> {
    if !windowed {
        return Ok(vec![false; n]);
    }
    if let Some(types) = field(j, "layer_types").and_then(Json::as_array) {
        if types.len() != n {
            return Err(Error::format(
                path,
                format!("`layer_types` lists {} layers but num_hidden_layers is {n}", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(Error::unsupported(
                    path,
                    format!("layer type {t} in `layer_types` (expected full_attention or sliding_attention)"),
                )),
            })
            .collect();
    }
    if arch == Arch::Gemma2 {
        // Gemma 2 configs without `layer_types`: the even layers slide, as transformers reads them.
        return Ok((0..n).map(|l| l % 2 == 0).collect());
    }
    if arch == Arch::Gemma3 {
        // transformers 4's Gemma 3 configs: every `sliding_window_pattern`-th layer is global.
        let pattern = field(j, "sliding_window_pattern")
            .or_else(|| field(j, "_sliding_window_pattern"))
            .and_then(Json::as_u64)
            .map_or(6, |v| v.max(1) as usize);
        return Ok((0..n).map(|l| (l + 1) % pattern != 0).collect());
    }
    if matches!(arch, Arch::Qwen2 | Arch::Qwen3) {
        let from = field(j, "max_window_layers").and_then(Json::as_u64).map_or(n, |v| v as usize);
        return Ok((0..n).map(|l| l >= from).collect());
    }
    Ok(vec![true; n])
}

fn rope_type(s: &Json) -> &str {
    field(s, "rope_type").or_else(|| field(s, "type")).and_then(Json::as_str).unwrap_or("default")
}

/// LongRoPE's attention factor where the config gives none, as transformers computes it:
/// sqrt(1 + ln(s) / ln(original)) for s = context / original > 1, else 1.
pub(crate) fn longrope_attention_factor(context: usize, original: usize) -> f32 {
    let s = context as f64 / original.max(1) as f64;
    if s <= 1.0 { 1.0 } else { (1.0 + s.ln() / (original as f64).ln()).sqrt() as f32 }
}

/// Phi-3's `longrope` scaling: its factor lists, the original context (in the scaling or the
/// config) and the attention factor (given, or from the ratio of the contexts).
fn parse_longrope(path: &Path, j: &Json, s: &Json, max_position: usize) -> Result<RopeScaling> {
    let list = |k: &str| -> Result<Vec<f32>> {
        field(s, k)
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::format(path, format!("longrope needs `{k}`, a list of numbers")))
    };
    let original = field(s, "original_max_position_embeddings")
        .or_else(|| field(j, "original_max_position_embeddings"))
        .and_then(Json::as_u64)
        .ok_or_else(|| Error::format(path, "longrope needs `original_max_position_embeddings`"))?
        as usize;
    let attention_factor = match field(s, "attention_factor").and_then(Json::as_f64) {
        Some(a) => a as f32,
        None => match field(s, "factor").and_then(Json::as_f64) {
            Some(f) if f > 1.0 => (1.0 + f.ln() / (original as f64).ln()).sqrt() as f32,
            Some(_) => 1.0,
            None => longrope_attention_factor(max_position, original),
        },
    };
    Ok(RopeScaling::LongRope {
        short_factor: list("short_factor")?,
        long_factor: list("long_factor")?,
        original_max_position: original,
        attention_factor,
    })
}

fn parse_hf_rope_scaling(path: &Path, s: &Json) -> Result<Option<RopeScaling>> {
    let ty = field(s, "rope_type").or_else(|| field(s, "type")).and_then(Json::as_str).unwrap_or("default");
    let f = |k: &str, d: f64| field(s, k).and_then(Json::as_f64).unwrap_or(d) as f32;
    Ok(match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: f("factor", 1.0) }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position: f("original_max_position_embeddings", 8192.0),
        }),
        other => {
            return Err(Error::unsupported(
                path,
                format!("rope_scaling type `{other}`; edgetune supports default, linear and llama3"),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(factor: f32, lo: f32, hi: f32, context: f32) -> RopeScaling {
        RopeScaling::Llama3 { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position: context }
    }

    /// Llama 3.1's and 3.2's scaling (θ 500,000; heads of 128 and 64; factors 8 and 32; low and
    /// high frequency factors 1 and 4 over 8,192 tokens) and the tiny fixture's come back from
    /// their divisors exactly, as does the same scaling said with L, lo and hi doubled (the same
    /// divisors); divisors that are no Llama 3 scaling, or that leave it undetermined, give none.
    #[test]
    fn llama3_scaling_comes_back_from_its_divisors() {
        for (theta, dim, scaling) in [
            (500_000.0, 128, llama3(8.0, 1.0, 4.0, 8192.0)),
            (500_000.0, 64, llama3(32.0, 1.0, 4.0, 8192.0)),
            (10_000.0, 16, llama3(8.0, 1.0, 4.0, 64.0)),
            (500_000.0, 128, llama3(16.0, 1.0, 2.5, 32768.0)),
        ] {
            let divisors = scaling.llama3_divisors(theta, dim).expect("divisors");
            assert_eq!(RopeScaling::llama3_from_divisors(&divisors, theta, dim), Some(scaling.clone()));
            let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = scaling
            else {
                unreachable!()
            };
            // The converter computes the divisors in f32 (torch), not in f64 then rounded: its
            // formula in f32 arithmetic gives the scaling too.
            let (lo, hi, omp) = (low_freq_factor, high_freq_factor, original_max_position);
            let f32_divisors: Vec<f32> = (0..dim / 2)
                .map(|i| {
                    let freq = 1.0 / theta.powf((2 * i) as f32 / dim as f32);
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < omp / hi {
                        1.0
                    } else if wavelen > omp / lo {
                        factor
                    } else {
                        let smooth = (omp / wavelen - lo) / (hi - lo);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            assert_eq!(RopeScaling::llama3_from_divisors(&f32_divisors, theta, dim), Some(scaling.clone()));
            let doubled = llama3(factor, 2.0 * low_freq_factor, 2.0 * high_freq_factor, 2.0 * original_max_position);
            let same = doubled.llama3_divisors(theta, dim).expect("divisors");
            assert_eq!(same, divisors);
            assert_eq!(RopeScaling::llama3_from_divisors(&same, theta, dim), Some(scaling.clone()));
            // One divisor between the kept and the scaled ones moved by 1e-3: no Llama 3 scaling
            // where three or more lie between; with two, they fix L and hi, and the scaling found
            // gives the moved divisors.
            let between = divisors.iter().filter(|&&d| d > 1.0 && d < factor).count();
            let i = divisors.iter().position(|&d| d > 1.0 && d < factor).expect("a smooth divisor");
            let mut moved = divisors.clone();
            moved[i] *= 1.0 + 1e-3;
            match RopeScaling::llama3_from_divisors(&moved, theta, dim) {
                None => assert!(between >= 3, "{moved:?}"),
                Some(s) => {
                    assert_eq!(between, 2, "{moved:?}: {s:?}");
                    let back = s.llama3_divisors(theta, dim).expect("divisors");
                    assert!(back.iter().zip(&moved).all(|(a, b)| (a - b).abs() <= 1e-5 * b), "{back:?}");
                }
            }
            // The wrong base (where three or more divisors lie between), or a divisor missing.
            if between >= 3 {
                assert_eq!(RopeScaling::llama3_from_divisors(&divisors, theta * 2.0, dim), None);
            }
            assert_eq!(RopeScaling::llama3_from_divisors(&divisors[1..], theta, dim), None);
        }
        // Every frequency divided alike (linear scaling), none divided, LongRoPE-like rising
        // factors, and a step with one divisor between (undetermined).
        let step = llama3(8.0, 1.0, 1.5, 64.0).llama3_divisors(10_000.0, 16).expect("divisors");
        assert_eq!(step.iter().filter(|&&d| d > 1.0 && d < 8.0).count(), 1, "{step:?}");
        for divisors in [vec![4.0; 8], vec![1.0; 8], (0..8).map(|i| 1.0 + i as f32 * 0.5).collect(), step] {
            assert_eq!(RopeScaling::llama3_from_divisors(&divisors, 10_000.0, 16), None, "{divisors:?}");
        }
    }

    /// A Gemma config.json that leaves keys out reads as transformers reads it, with its config
    /// classes' defaults (transformers 5.25: `Gemma2Config()` has soft caps 50 and 30, head_dim
    /// 256, query_pre_attn_scalar 256, sliding_window 4096 and a RoPE base of 10000;
    /// `Gemma3TextConfig()` no soft caps, head_dim 256, a window of 4096 on five layers in six,
    /// RoPE bases of 1,000,000 and, on the window layers, 10000); a soft cap given as null is none.
    #[test]
    fn a_gemma_config_without_keys_gets_transformers_defaults() {
        let path = Path::new("config.json");
        let read = |model_type: &str, extra: &str| {
            let text = format!(
                r#"{{"model_type": "{model_type}", "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 6, "intermediate_size": 128, "vocab_size": 320{extra}}}"#
            );
            ModelConfig::from_hf_json(path, &text).expect("config")
        };
        let g2 = read("gemma2", "");
        assert_eq!((g2.attn_softcap, g2.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(
            (g2.head_dim, g2.query_scale, g2.rope_theta, g2.sliding_window),
            (256, 1.0 / 16.0, 10000.0, Some(4096))
        );
        assert_eq!(g2.window_layers, [true, false, true, false, true, false]);
        let g3 = read("gemma3_text", "");
        assert_eq!((g3.attn_softcap, g3.final_softcap, g3.head_dim, g3.sliding_window), (None, None, 256, Some(4096)));
        assert_eq!((g3.rope_theta, g3.sliding_rope.clone()), (1_000_000.0, Some((10000.0, None))));
        assert_eq!(g3.window_layers, [true, true, true, true, true, false]);
        let capped = read("gemma2", r#", "attn_logit_softcapping": null, "head_dim": 16"#);
        assert_eq!((capped.attn_softcap, capped.final_softcap, capped.head_dim), (None, Some(30.0), 16));
        // Other families keep their own: heads hidden / heads wide, no window.
        let llama = read("llama", "");
        assert_eq!((llama.head_dim, llama.sliding_window, llama.attn_softcap), (16, None, None));
    }
}
