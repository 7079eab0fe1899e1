//! GGUF LoRA adapters, as llama.cpp's `convert_lora_to_gguf.py` writes them and llama.cpp
//! (`--lora`, `llama_adapter_lora_init`) reads them: metadata `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha` and the base's `general.architecture`; tensors
//! `blk.N.<module>.weight.lora_a` (r, n_in) and `.lora_b` (n_out, r) in PEFT's orientation.
//!
//! llama.cpp applies `scale * alpha / r` with r read from the tensors; rsLoRA (alpha / sqrt(r))
//! is folded into the alpha written. For the llama family the converter permutes the rows of
//! q and k (see `weights::permute_rows`), and an adapter's B on q and k must be permuted the
//! same way, or it loads and silently gives wrong outputs.

use std::collections::BTreeSet;
use std::path::Path;

use super::{Adapter, LoraHyper, Module};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::{GgufFile, Value};
use crate::model::gguf_write::GgufWriter;
use crate::model::weights::{permute_rows, unpermute_rows};
use crate::quant::gguf_blocks::GgmlType;

/// The tensor types llama.cpp's converter writes for adapters.
pub const TYPES: [GgmlType; 4] = [GgmlType::F32, GgmlType::F16, GgmlType::Bf16, GgmlType::Q8_0];

/// A module's name in GGUF tensor names (`attn_q`).
pub fn module_name(m: Module) -> &'static str {
    match m {
        Module::QProj => "attn_q",
        Module::KProj => "attn_k",
        Module::VProj => "attn_v",
        Module::OProj => "attn_output",
        Module::GateProj => "ffn_gate",
        Module::UpProj => "ffn_up",
        Module::DownProj => "ffn_down",
        Module::QkvProj => "attn_qkv",
        // llama.cpp's phi3 keeps the fused gate and up projection under the up projection's name.
        Module::GateUpProj => "ffn_up",
    }
}

fn tensor_name(layer: usize, m: Module, b: bool) -> String {
    format!("blk.{layer}.{}.weight.lora_{}", module_name(m), if b { "b" } else { "a" })
}

/// The heads whose rows llama.cpp permutes in this module's output, if it permutes them.
pub(crate) fn permuted_heads(model: &ModelConfig, m: Module) -> Option<usize> {
    match m {
        Module::QProj if model.arch.gguf_permutes_qk() => Some(model.num_heads),
        Module::KProj if model.arch.gguf_permutes_qk() => Some(model.num_kv_heads),
        _ => None,
    }
}

/// What [`save`] wrote: the tensors that could not take the type asked for (rows that are no
/// whole number of its blocks, such as B's rows of r values in Q8_0) went to F16, as in
/// llama.cpp's converter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Tensors written (an A and a B for each adapted module).
    pub tensors: usize,
    /// Of those, tensors written as F16 because the asked-for type's blocks do not fit them.
    pub fell_back_to_f16: usize,
}

/// Writes `adapter`, trained on a model with config `model`, as a GGUF LoRA adapter with
/// tensors of type `ty` (F32, F16, BF16 or Q8_0).
pub fn save(path: &Path, adapter: &Adapter, model: &ModelConfig, ty: GgmlType) -> Result<Saved> {
    if !TYPES.contains(&ty) {
        return Err(Error::invalid(
            "GGUF adapter type",
            format!("{} (expected one of {})", ty.name(), TYPES.map(GgmlType::name).join(", ")),
        ));
    }
    let c = &adapter.config;
    let r = adapter.layout.r;
    // llama.cpp scales by alpha / r: fold rsLoRA's alpha / sqrt(r) into the alpha written.
    let alpha = if c.use_rslora { c.alpha * (r as f32).sqrt() } else { c.alpha };
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(model.arch.gguf_name().into()));
    w.set("general.type", Value::String("adapter".into()));
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(alpha));
    let mut saved = Saved { tensors: 0, fell_back_to_f16: 0 };
    for s in &adapter.layout.slots {
        let a = &adapter.params[s.a..s.a + r * s.n_in];
        let mut b = adapter.params[s.b..s.b + s.n_out * r].to_vec();
        if let Some(heads) = permuted_heads(model, s.module) {
            b = permute_rows(&b, &[s.n_out, r], heads);
        }
        for (is_b, values, shape) in [(false, a, [r, s.n_in]), (true, &b[..], [s.n_out, r])] {
            let t = if shape[1].is_multiple_of(ty.block().0) {
                ty
            } else {
                saved.fell_back_to_f16 += 1;
                GgmlType::F16
            };
            w.add_tensor(&tensor_name(s.layer, s.module, is_b), &shape, t, values)?;
            saved.tensors += 1;
        }
    }
    w.write(path)?;
    Ok(saved)
}

/// Loads a GGUF LoRA adapter for a model with config `model`, with llama.cpp's q/k row
/// permutation undone.
pub fn load(path: &Path, model: &ModelConfig) -> Result<Adapter> {
    let g = GgufFile::open(path)?;
    let meta = |k: &str| g.get(k).and_then(Value::as_str);
    if meta("general.type") != Some("adapter") || meta("adapter.type") != Some("lora") {
        return Err(Error::format(
            path,
            format!(
                "not a GGUF LoRA adapter (general.type = {:?}, adapter.type = {:?}; expected \"adapter\" and \"lora\")",
                meta("general.type").unwrap_or("missing"),
                meta("adapter.type").unwrap_or("missing")
            ),
        ));
    }
    let arch = g.get_str("general.architecture")?;
    if arch != model.arch.gguf_name() {
        return Err(Error::format(
            path,
            format!("adapter for architecture `{arch}`, but the model is `{}`", model.arch.gguf_name()),
        ));
    }
    let mut present = BTreeSet::new();
    let mut rank = None;
    for (name, info) in &g.tensors {
        let (layer, m, b) = parse_name(name, model).ok_or_else(|| {
            Error::unsupported(path, format!("tensor `{name}` (expected blk.N.<module>.weight.lora_a or .lora_b)"))
        })?;
        // A (r, n_in) and B (n_out, r): r is A's first dimension and B's second.
        let shape = info.shape();
        let r = match (shape.as_slice(), b) {
            (&[r, _], false) | (&[_, r], true) => r,
            _ => {
                return Err(Error::format(
                    path,
                    format!("`{name}` has shape {shape:?}: a LoRA matrix has 2 dimensions"),
                ));
            }
        };
        if *rank.get_or_insert(r) != r {
            return Err(Error::unsupported(
                path,
                format!(
                    "`{name}` has rank {r} but others have {}: one rank for every module is supported",
                    rank.unwrap_or(r)
                ),
            ));
        }
        present.insert((layer, m));
    }
    let r = rank.ok_or_else(|| Error::format(path, "holds no LoRA tensors"))?;
    // llama.cpp: an adapter without alpha (or alpha 0) is applied unscaled, i.e. alpha = r.
    let alpha = match g.get("adapter.lora.alpha").and_then(Value::as_f64) {
        Some(a) if a != 0.0 => a as f32,
        _ => r as f32,
    };
    let hyper = LoraHyper { r, alpha, dropout: 0.0, use_rslora: false };
    super::LoraConfig { r, alpha, ..Default::default() }.validate().map_err(|e| Error::format(path, e.to_string()))?;
    Adapter::from_file(path, model, &present, hyper, |_, s, b| {
        let name = tensor_name(s.layer, s.module, b);
        let (values, shape) = g.tensor_f32(&name)?;
        let expected = if b { vec![s.n_out, r] } else { vec![r, s.n_in] };
        if shape != expected {
            return Err(Error::Shape { path: path.to_path_buf(), tensor: name, actual: shape, expected });
        }
        Ok(match permuted_heads(model, s.module) {
            Some(heads) if b => unpermute_rows(&values, &shape, heads),
            _ => values,
        })
    })
}

/// (layer, module, is_b) of `blk.N.<module>.weight.lora_a|lora_b`.
fn parse_name(name: &str, model: &ModelConfig) -> Option<(usize, Module, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, ab) = rest.split_once(".weight.lora_")?;
    let m = Module::adaptable(model).into_iter().find(|&m| module_name(m) == module)?;
    let b = match ab {
        "a" => false,
        "b" => true,
        _ => return None,
    };
    Some((layer.parse().ok()?, m, b))
}

/// An Ollama `Modelfile` for `ollama create NAME -f Modelfile`: `FROM` the base (or a merged
/// GGUF) and, for an adapter, `ADAPTER` the GGUF LoRA file. Paths are written absolute, so the
/// file works from any folder.
pub fn modelfile(from: &Path, adapter: Option<&Path>) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let mut s = String::from("# Written by edgetune: `ollama create NAME -f THIS_FILE`, then `ollama run NAME`.\n");
    s.push_str(&format!("FROM {}\n", abs(from)));
    if let Some(a) = adapter {
        s.push_str(&format!("ADAPTER {}\n", abs(a)));
    }
    s
}
