//! Merging an adapter into its base model: every adapted weight becomes W + scale * B A, and the
//! whole model is written as a Hugging Face folder of f16 or bf16 safetensors that transformers
//! (and edgetune) load like any other checkpoint, or ([`merge_gguf`]) as one GGUF file for
//! llama.cpp, Ollama and LM Studio.
//!
//! The base is read from its source file (a Hugging Face folder or a GGUF file), never from the
//! GPU, so the merge starts from the original weights rather than their NF4 rounding. A GGUF
//! base gets a `config.json` and tokenizer files written from its metadata; a folder's own
//! files are copied. Weights go to shards of at most 2 GiB (`model.safetensors`, or
//! `model-0000i-of-0000n.safetensors` with an index), each written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Adapter, Layout, Module, Slot};
use crate::atomic::{write_atomic, write_atomic_with};
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::model::gguf::Value;
use crate::model::gguf_write::GgufWriter;
use crate::model::hf_gguf;
use crate::model::weights::{WeightSource, gguf_name, gguf_permuted_heads, permute_rows};
use crate::quant::gguf_blocks::GgmlType;
use crate::safetensors_write::{Entry, header};
use crate::tokenizer::gguf_vocab::{ConverterClass, SentencePieceVocab, sentencepiece_files};

/// The precision of the merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeDtype {
    /// IEEE half precision.
    #[default]
    F16,
    /// bfloat16, as models trained in it ship.
    Bf16,
    /// IEEE single precision: every value a GGUF file's blocks decode to, exactly (four bytes a
    /// weight).
    F32,
}

impl std::str::FromStr for MergeDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" | "float16" => Ok(MergeDtype::F16),
            "bf16" | "bfloat16" => Ok(MergeDtype::Bf16),
            "f32" | "float32" => Ok(MergeDtype::F32),
            other => Err(Error::invalid("dtype", format!("`{other}` (expected f16, bf16 or f32)"))),
        }
    }
}

const SHARD_BYTES: usize = 2 << 30;

/// A tensor to write: its name, shape and, for an adaptable linear weight, (layer, module).
type TensorSpec = (String, Vec<usize>, Option<(usize, Module)>);
/// The Hugging Face names and shapes of every tensor of a Llama-family model.
fn tensor_list(c: &ModelConfig, has_lm_head: bool) -> Vec<TensorSpec> {
    let h = c.hidden_size;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], None)];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], None));
        for m in Module::adaptable(c) {
            let (n_out, n_in) = m.shape(c);
            out.push((format!("{p}.{}.{}.weight", m.parent(), m.name()), vec![n_out, n_in], Some((l, m))));
            if c.qkv_bias && matches!(m, Module::QProj | Module::KProj | Module::VProj) {
                out.push((format!("{p}.{}.{}.bias", m.parent(), m.name()), vec![n_out], None));
            }
        }
        if c.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim], None));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim], None));
        }
        out.push((format!("{p}.{}.weight", c.mlp_norm_name()), vec![h], None));
        if c.sandwich_norms {
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h], None));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h], None));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], None));
    if has_lm_head {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], None));
    }
    out
}

/// config.json for a model read from GGUF metadata.
pub fn hf_config(c: &ModelConfig, dtype: MergeDtype) -> Result<serde_json::Value> {
    let class = match c.arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Mistral => "MistralForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
        Arch::Qwen3 => "Qwen3ForCausalLM",
        Arch::Gemma2 => "Gemma2ForCausalLM",
        Arch::Gemma3 => "Gemma3ForCausalLM",
        Arch::Phi3 => "Phi3ForCausalLM",
    };
    let mut j = json!({
        "architectures": [class],
        "model_type": c.arch.name(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": match dtype {
            MergeDtype::F16 => "float16",
            MergeDtype::Bf16 => "bfloat16",
            MergeDtype::F32 => "float32",
        },
        "bos_token_id": c.bos_token_id,
        "eos_token_id": match c.eos_token_ids.as_slice() { [one] => json!(one), many => json!(many) },
    });
    if c.arch == Arch::Llama {
        j["attention_bias"] = json!(c.qkv_bias);
        j["mlp_bias"] = json!(false);
    }
    if c.arch == Arch::Qwen3 {
        j["attention_bias"] = json!(c.qkv_bias);
    }
    if c.rotary_dim != c.head_dim {
        j["partial_rotary_factor"] = json!(c.rotary_dim as f64 / c.head_dim as f64);
    }
    if matches!(c.arch, Arch::Gemma2 | Arch::Gemma3) {
        j["hidden_activation"] = json!("gelu_pytorch_tanh");
        j["query_pre_attn_scalar"] = json!((1.0 / f64::from(c.query_scale).powi(2)).round());
        j["attention_bias"] = json!(false);
    }
    // Gemma 2's caps, under the names transformers reads (null where the model has none).
    if c.arch == Arch::Gemma2 {
        j["attn_logit_softcapping"] = json!(c.attn_softcap);
        j["final_logit_softcapping"] = json!(c.final_softcap);
    }
    match &c.sliding_rope {
        None => {}
        // transformers reads Gemma 3's local RoPE base from this key (its configs before
        // `rope_parameters`); edgetune reads either.
        Some((theta, None)) => j["rope_local_base_freq"] = json!(theta),
        Some((_, Some(_))) => {
            return Err(Error::invalid("merge", "a scaled RoPE on the sliding-window layers cannot be written"));
        }
    }
    if let Some(w) = c.sliding_window {
        j["sliding_window"] = json!(w);
        let types: Vec<&str> = (0..c.num_layers)
            .map(|l| if c.layer_window(l).is_some() { "sliding_attention" } else { "full_attention" })
            .collect();
        j["layer_types"] = json!(types);
    }
    // Llama 3's scaling, or a GGUF file's per-frequency divisors that are Llama 3's scaling,
    // said as its parameters.
    let llama3 = match &c.rope_scaling {
        Some(s @ RopeScaling::Llama3 { .. }) => Some(s.clone()),
        Some(RopeScaling::Factors(divisors)) => {
            Some(RopeScaling::llama3_from_divisors(divisors, c.rope_theta, c.rotary_dim).ok_or_else(|| {
                Error::invalid(
                    "merge",
                    "this GGUF's per-dimension RoPE factors (rope_freqs.weight) are not Llama 3's RoPE scaling, \
                     the only such factors config.json can express",
                )
            })?)
        }
        _ => None,
    };
    if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) = llama3 {
        // A whole context as the integer transformers expects.
        let context = if original_max_position.fract() == 0.0 {
            json!(original_max_position as u64)
        } else {
            json!(original_max_position)
        };
        j["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": context,
        });
    }
    match &c.rope_scaling {
        None | Some(RopeScaling::Llama3 { .. } | RopeScaling::Factors(_)) => {}
        Some(RopeScaling::Linear { factor }) => j["rope_scaling"] = json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::LongRope { short_factor, long_factor, original_max_position, attention_factor }) => {
            j["rope_scaling"] = json!({
                "rope_type": "longrope",
                "short_factor": short_factor,
                "long_factor": long_factor,
                "attention_factor": attention_factor,
                "original_max_position_embeddings": original_max_position,
            });
            j["original_max_position_embeddings"] = json!(original_max_position);
        }
    }
    Ok(j)
}

fn to_bytes(v: &[f32], dtype: MergeDtype) -> Vec<u8> {
    match dtype {
        MergeDtype::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        MergeDtype::Bf16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        MergeDtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// W (n_out, n_in) += scale * B (n_out, r) A (r, n_in).
fn add_delta(w: &mut [f32], a: &[f32], b: &[f32], r: usize, n_in: usize, scale: f32) {
    for (o, row) in w.chunks_exact_mut(n_in).enumerate() {
        for k in 0..r {
            let coef = scale * b[o * r + k];
            if coef != 0.0 {
                for (x, &av) in row.iter_mut().zip(&a[k * n_in..(k + 1) * n_in]) {
                    *x += coef * av;
                }
            }
        }
    }
}

/// Merges `adapter` into the model at `model_path` and writes a Hugging Face folder to `out`.
/// Returns the number of weight shards written.
pub fn merge(model_path: &Path, adapter: &Adapter, out: &Path, dtype: MergeDtype) -> Result<usize> {
    write_folder(model_path, Some(adapter), out, dtype)
}

/// Writes the model at `model_path` (a GGUF file, say) as a Hugging Face folder to `out`, its
/// weights as they decode, with no adapter. Returns the number of weight shards written.
pub fn convert(model_path: &Path, out: &Path, dtype: MergeDtype) -> Result<usize> {
    write_folder(model_path, None, out, dtype)
}

fn write_folder(model_path: &Path, adapter: Option<&Adapter>, out: &Path, dtype: MergeDtype) -> Result<usize> {
    write_folder_in_shards(model_path, adapter, out, dtype, SHARD_BYTES)
}

/// [`write_folder`] with shards of at most `shard_bytes` of tensor data (a tensor larger than
/// that has a shard of its own). The shards are cut from the tensors' sizes first; then each
/// file is written as a stream, each tensor converted as the file reaches it and dropped once
/// written, so a merge holds one tensor at a time (in f32 and converted), not the merged model.
fn write_folder_in_shards(
    model_path: &Path,
    adapter: Option<&Adapter>,
    out: &Path,
    dtype: MergeDtype,
    shard_bytes: usize,
) -> Result<usize> {
    let (cfg, src) = crate::model::open_weights(model_path)?;
    if let Some(adapter) = adapter {
        let expected = Layout::new(&cfg, &adapter.config)?;
        if expected != adapter.layout || adapter.params.len() != expected.len {
            return Err(Error::invalid("adapter", "its shapes do not fit this model (an adapter for another model?)"));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let has_lm_head = !cfg.tie_word_embeddings && src.contains(&cfg, "lm_head.weight");
    let st_dtype = match dtype {
        MergeDtype::F16 => Dtype::F16,
        MergeDtype::Bf16 => Dtype::BF16,
        MergeDtype::F32 => Dtype::F32,
    };
    let mut tensors = tensor_list(&cfg, has_lm_head);
    if cfg.multimodal {
        // A multimodal model's text tensors under the names they are stored under, and its
        // other tensors (the vision tower, the projector) converted as they are.
        let text: std::collections::HashSet<String> = tensors.iter().map(|t| t.0.clone()).collect();
        let others: Vec<TensorSpec> = src
            .list()
            .into_iter()
            .filter(|t| !text.contains(&crate::model::weights::text_model_name(&t.name)))
            .map(|t| (t.name, t.shape, None))
            .collect();
        for t in &mut tensors {
            t.0 = src.stored_name(&t.0).unwrap_or(&t.0).to_string();
        }
        tensors.extend(others);
    }
    let size = |shape: &[usize]| Entry { name: "", dtype: st_dtype, shape }.bytes();
    // Shards cut as they fill, in the tensors' order.
    let mut shards: Vec<&[TensorSpec]> = Vec::new();
    let (mut first, mut used) = (0, 0);
    for (i, (_, shape, _)) in tensors.iter().enumerate() {
        if used + size(shape) > shard_bytes && used > 0 {
            shards.push(&tensors[first..i]);
            (first, used) = (i, 0);
        }
        used += size(shape);
    }
    shards.push(&tensors[first..]);
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) }
    };
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    let meta = BTreeMap::from([("format", "pt".to_string())]);
    for (i, shard) in shards.iter().enumerate() {
        let entries: Vec<Entry<'_>> =
            shard.iter().map(|(name, shape, _)| Entry { name, dtype: st_dtype, shape }).collect();
        let (head, order) = header(&entries, &meta)?;
        let path = out.join(file_name(i));
        // Each tensor converted as the file reaches it and dropped once written.
        write_atomic_with(&path, |f| {
            f.write_all(&head).map_err(|e| Error::io(&path, e))?;
            for t in order {
                let ((name, shape, slot), e) = (&shard[t], &entries[t]);
                let mut w = src.get(&cfg, &crate::model::weights::text_model_name(name), shape)?;
                if let Some(adapter) = adapter
                    && let Some(s) = slot.and_then(|(l, m)| adapter.layout.slot(l, m))
                {
                    let (r, scale) = (adapter.layout.r, adapter.config.scale());
                    let a = &adapter.params[s.a..s.a + r * s.n_in];
                    let b = &adapter.params[s.b..s.b + s.n_out * r];
                    add_delta(&mut w, a, b, r, s.n_in, scale);
                }
                let bytes = to_bytes(&w, dtype);
                if bytes.len() != e.bytes() {
                    return Err(Error::invalid(
                        "merged tensor",
                        format!("{name}: {} bytes where its shape {shape:?} makes {}", bytes.len(), e.bytes()),
                    ));
                }
                f.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
                weight_map.insert(name.clone(), file_name(i));
                total += bytes.len();
            }
            Ok(())
        })?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    write_side_files(model_path, &cfg, out, dtype)?;
    Ok(n)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::invalid("JSON", e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// config.json, the tokenizer files and generation_config.json: copied from a folder, written
/// from the metadata of a GGUF file.
fn write_side_files(model_path: &Path, cfg: &ModelConfig, out: &Path, dtype: MergeDtype) -> Result<()> {
    if model_path.is_dir() {
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "added_tokens.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "chat_template.json",
            // A multimodal model's image processor.
            "preprocessor_config.json",
            "processor_config.json",
        ] {
            let from = model_path.join(f);
            if from.exists() {
                // tokenizer.json is the largest of them.
                let bytes = crate::files::read(&from, crate::files::TOKENIZER_BYTES, f, "")?;
                write_atomic(&out.join(f), &bytes)?;
            }
        }
        return Ok(());
    }
    let gguf = crate::model::gguf::GgufFile::open(model_path)?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&gguf)?;
    let mut config = hf_config(cfg, dtype)?;
    // The other special tokens by id as well: transformers' `pad_token_id`, and what the
    // converter reads for a token that is not an added one.
    for (key, id) in tok.special_token_ids() {
        config[key] = json!(id);
    }
    write_json(&out.join("config.json"), &config)?;
    let (tokenizer_json, mut tokenizer_config) = tok.hf_files(cfg.max_position_embeddings)?;
    // A Phi-3 folder's tokenizer is its tokenizer.model unless this class is named (Phi-4-mini's
    // folder names it): llama.cpp's converter reads a byte-level vocabulary only then.
    if cfg.arch == Arch::Phi3 && tok.is_gguf_byte_level() {
        tokenizer_config["tokenizer_class"] = json!("GPT2Tokenizer");
    }
    write_atomic(&out.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config)?;
    // A SentencePiece vocabulary also as the tokenizer.model llama.cpp's converter reads it
    // from, and its user-defined tokens in added_tokens.json, where SentencePiece would load it.
    let sentencepiece = SentencePieceVocab::from_gguf(&gguf).and_then(|v| sentencepiece_files(&v));
    if let Some((model, added)) = sentencepiece {
        write_atomic(&out.join("tokenizer.model"), &model)?;
        if let Some(added) = added {
            write_atomic(&out.join("added_tokens.json"), added.as_bytes())?;
        }
    }
    let generation = json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": match cfg.eos_token_ids.as_slice() { [one] => json!(one), many => json!(many) },
    });
    write_json(&out.join("generation_config.json"), &generation)
}

/// What [`merge_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedGguf {
    /// Tensors written.
    pub tensors: usize,
    /// Weights whose rows are no whole number of the type's blocks, written in
    /// [`fallback`]`(ty)` instead.
    pub fell_back: usize,
}

/// The ggml types a merged GGUF can be written in.
pub const GGUF_TYPES: [GgmlType; 6] =
    [GgmlType::F32, GgmlType::F16, GgmlType::Bf16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K];

/// The type a matrix gets when its rows are no whole number of `ty`'s blocks: Q8_0 for Q4_K
/// (rows of 32k values, such as SmolLM2's 576), else F16, as llama.cpp's converter does.
pub fn fallback(ty: GgmlType, row: usize) -> GgmlType {
    if ty == GgmlType::Q4K && row.is_multiple_of(32) { GgmlType::Q8_0 } else { GgmlType::F16 }
}

/// llama.cpp's `general.file_type` (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, ...) of a merged file.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q8_0 => 7,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::Bf16 => 32,
    }
}

/// Merges `adapter` into the model at `model_path` and writes one GGUF file that llama.cpp,
/// Ollama and LM Studio open as a model, every matrix in `ty` (norms and other vectors stay F32,
/// as llama.cpp's converter keeps them), with W + scale * B A in the file's own row order.
///
/// From a GGUF base: the base's metadata (tokenizer, chat template, hyper-parameters) and
/// tensor names, the q/k permutation applied to the update. From a Hugging Face folder (Llama,
/// Mistral, Qwen2, Qwen3, Gemma 2 or Gemma 3 with a SentencePiece or byte-level BPE tokenizer):
/// the metadata, tensor names, q/k row order and Gemma's 1 + w norms that llama.cpp's
/// `convert_hf_to_gguf.py` writes for it (see `model::hf_gguf`,
/// `model::weights::gguf_permuted_heads` and `tokenizer::gguf_vocab`); any other folder, or one
/// whose file llama.cpp would run otherwise, is refused with nothing written.
pub fn merge_gguf(model_path: &Path, adapter: &Adapter, out: &Path, ty: GgmlType) -> Result<MergedGguf> {
    write_gguf(model_path, Some(adapter), out, ty)
}

/// Writes the model at `model_path` (a Hugging Face folder, say) as one GGUF file with no
/// adapter, as [`merge_gguf`] writes it: what llama.cpp's converter makes of a folder.
pub fn convert_gguf(model_path: &Path, out: &Path, ty: GgmlType) -> Result<MergedGguf> {
    write_gguf(model_path, None, out, ty)
}

fn write_gguf(model_path: &Path, adapter: Option<&Adapter>, out: &Path, ty: GgmlType) -> Result<MergedGguf> {
    if !GGUF_TYPES.contains(&ty) {
        return Err(Error::invalid(
            "merge type",
            format!("{} (expected one of {})", ty.name(), GGUF_TYPES.map(GgmlType::name).join(", ")),
        ));
    }
    let (cfg, src) = crate::model::open_weights(model_path)?;
    if let Some(adapter) = adapter {
        let expected = Layout::new(&cfg, &adapter.config)?;
        if expected != adapter.layout || adapter.params.len() != expected.len {
            return Err(Error::invalid("adapter", "its shapes do not fit this model (an adapter for another model?)"));
        }
    }
    let WeightSource::Gguf(g) = &src else {
        return gguf_from_folder(model_path, &cfg, &src, adapter, out, ty);
    };
    let mut merged = MergedGguf { tensors: 0, fell_back: 0 };
    let mut w = GgufWriter::with_metadata_of(g);
    w.set("general.file_type", Value::U32(file_type(ty)));
    // The file's layout first, from the base's shapes; then each tensor merged and quantized
    // as the file reaches it, so no more than one is held.
    for (name, info) in &g.tensors {
        let shape = info.shape();
        if let Some(adapter) = adapter
            && let Some(s) = slot_of(name, &cfg, adapter)
            && shape != [s.n_out, s.n_in]
        {
            return Err(Error::Shape {
                path: model_path.to_path_buf(),
                tensor: name.clone(),
                actual: shape,
                expected: vec![s.n_out, s.n_in],
            });
        }
        w.declare_tensor(name, &shape, tensor_type(ty, &shape, &mut merged.fell_back))?;
        merged.tensors += 1;
    }
    w.write_with(out, |name| {
        let (mut values, _) = g.tensor_f32(name)?;
        if let Some(adapter) = adapter
            && let Some(s) = slot_of(name, &cfg, adapter)
        {
            let r = adapter.layout.r;
            let a = &adapter.params[s.a..s.a + r * s.n_in];
            let mut b = adapter.params[s.b..s.b + s.n_out * r].to_vec();
            if let Some(h) = super::gguf::permuted_heads(&cfg, s.module) {
                b = permute_rows(&b, &[s.n_out, r], h);
            }
            add_delta(&mut values, a, &b, r, s.n_in, adapter.config.scale());
        }
        Ok(values)
    })?;
    Ok(merged)
}

/// The type a tensor of `shape` is written in for a file of `ty`: F32 for vectors, `ty` for
/// matrices whose rows are whole blocks of it, else [`fallback`] (counted in `fell_back`).
fn tensor_type(ty: GgmlType, shape: &[usize], fell_back: &mut usize) -> GgmlType {
    match shape.last() {
        _ if shape.len() < 2 => GgmlType::F32,
        Some(&row) if row.is_multiple_of(ty.block().0) => ty,
        Some(&row) => {
            *fell_back += 1;
            fallback(ty, row)
        }
        None => GgmlType::F32,
    }
}

/// [`write_gguf`] of a Hugging Face folder: the converter's metadata and tensor names, q and k
/// permuted whole after the update is added in the folder's row order.
fn gguf_from_folder(
    model_path: &Path,
    cfg: &ModelConfig,
    src: &WeightSource,
    adapter: Option<&Adapter>,
    out: &Path,
    ty: GgmlType,
) -> Result<MergedGguf> {
    let mut merged = MergedGguf { tensors: 0, fell_back: 0 };
    let mut w = GgufWriter::new();
    for (k, v) in hf_gguf::hparams(model_path, cfg)? {
        w.set(&k, v);
    }
    w.set("general.file_type", Value::U32(file_type(ty)));
    let class = match cfg.arch {
        Arch::Llama | Arch::Mistral => ConverterClass::Llama,
        Arch::Gemma2 | Arch::Gemma3 => ConverterClass::Gemma,
        Arch::Phi3 => ConverterClass::Phi3,
        Arch::Qwen2 | Arch::Qwen3 => ConverterClass::Plain,
    };
    for (k, v) in crate::tokenizer::gguf_vocab::gguf_metadata(model_path, cfg.vocab_size, class)? {
        w.set(&k, v);
    }
    let has_lm_head = !cfg.tie_word_embeddings && src.contains(cfg, "lm_head.weight");
    let tensors = tensor_list(cfg, has_lm_head);
    let mut names = std::collections::HashMap::new();
    let extra = hf_gguf::config_tensors(cfg);
    for (name, values) in &extra {
        w.declare_tensor(name, &[values.len()], GgmlType::F32)?;
    }
    for (i, (name, shape, _)) in tensors.iter().enumerate() {
        let gguf = gguf_name(cfg, name).ok_or_else(|| {
            Error::unsupported(
                model_path,
                format!("tensor `{name}` has no GGUF name in a {} file", cfg.arch.gguf_name()),
            )
        })?;
        w.declare_tensor(&gguf, shape, tensor_type(ty, shape, &mut merged.fell_back))?;
        names.insert(gguf, i);
    }
    merged.tensors = names.len() + extra.len();
    w.write_with(out, |gguf| {
        let Some(&i) = names.get(gguf) else {
            return extra
                .iter()
                .find(|(name, _)| *name == gguf)
                .map(|(_, values)| values.clone())
                .ok_or_else(|| Error::invalid("merged tensor", format!("{gguf}: not declared")));
        };
        let (name, shape, slot) = &tensors[i];
        let mut values = src.get(cfg, name, shape)?;
        if let Some(adapter) = adapter
            && let Some(s) = slot.and_then(|(l, m)| adapter.layout.slot(l, m))
        {
            let r = adapter.layout.r;
            let a = &adapter.params[s.a..s.a + r * s.n_in];
            let b = &adapter.params[s.b..s.b + s.n_out * r];
            add_delta(&mut values, a, b, r, s.n_in, adapter.config.scale());
        }
        if let Some(h) = gguf_permuted_heads(cfg, gguf) {
            values = permute_rows(&values, shape, h);
        }
        // Gemma's norms scale by 1 + w: the converter stores that sum (the loader's inverse).
        if cfg.norm_offset != 0.0 && gguf.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v += cfg.norm_offset);
        }
        Ok(values)
    })?;
    Ok(merged)
}

/// The adapter's slot for a GGUF weight, when the adapter adapts it.
fn slot_of(name: &str, cfg: &ModelConfig, adapter: &Adapter) -> Option<Slot> {
    adapted(name, cfg).and_then(|(l, m)| adapter.layout.slot(l, m))
}

/// (layer, module) of an adaptable GGUF weight (`blk.3.attn_q.weight`).
fn adapted(name: &str, cfg: &ModelConfig) -> Option<(usize, Module)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    let m = Module::adaptable(cfg).into_iter().find(|&m| super::gguf::module_name(m) == module)?;
    Some((layer.parse().ok()?, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's tiny Llama.
    fn tiny_llama() -> std::path::PathBuf {
        crate::files::test_fixtures().join("tiny_llama")
    }

    /// Shards are cut from the tensors' sizes before any is converted: with shards of 40,000
    /// bytes the tiny Llama is written as several `model-0000i-of-0000n` files and an index
    /// whose total and map cover every tensor once, each shard within the size unless one
    /// tensor alone is larger, and the folder, like the one-file conversion, loads to exactly
    /// the model's tensors.
    #[test]
    fn a_model_written_in_many_shards_loads_as_the_model_it_came_from() {
        let base = std::env::temp_dir().join(format!("edgetune-merge-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (one, many) = (base.join("one"), base.join("many"));
        let limit = 40_000;
        let n1 = write_folder_in_shards(&tiny_llama(), None, &one, MergeDtype::F32, SHARD_BYTES).expect("one file");
        let n = write_folder_in_shards(&tiny_llama(), None, &many, MergeDtype::F32, limit).expect("shards");
        assert_eq!(n1, 1);
        assert!(n > 2, "{n} shards");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(many.join("model.safetensors.index.json")).expect("index"))
                .expect("JSON");
        // The fixture's own tensors (f32), which an f32 conversion keeps bit for bit.
        let (cfg, src) = crate::model::open_weights(&tiny_llama()).expect("the fixture opens");
        let tensors = tensor_list(&cfg, !cfg.tie_word_embeddings && src.contains(&cfg, "lm_head.weight"));
        let map = index["weight_map"].as_object().expect("weight_map");
        assert_eq!(map.len(), tensors.len());
        let total: usize = tensors.iter().map(|(_, s, _)| 4 * s.iter().product::<usize>()).sum();
        assert_eq!(index["metadata"]["total_size"], total);
        for i in 1..=n {
            let file = format!("model-{i:05}-of-{n:05}.safetensors");
            let bytes = std::fs::read(many.join(&file)).expect("shard");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
            // Laid out as the safetensors crate lays out the same tensors, byte for byte.
            let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
            let theirs = safetensors::tensor::serialize(st.tensors(), Some(meta)).expect("serialize");
            assert!(bytes == theirs, "{file}: not the crate's layout");
            let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
            assert!(data <= limit || st.len() == 1, "{file}: {data} bytes in {} tensors", st.len());
            for (name, _) in st.tensors() {
                assert_eq!(map[&name], file, "{name}");
            }
        }
        for folder in [&one, &many] {
            let (cfg2, src2) = crate::model::open_weights(folder).expect("the output opens");
            for (name, shape, _) in &tensors {
                let a = src.get(&cfg, name, shape).expect("the fixture's");
                let b = src2.get(&cfg2, name, shape).unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
                assert!(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}");
            }
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
