//! PEFT adapter folders: `adapter_model.safetensors` (keys
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, A (r, n_in),
//! B (n_out, r)) and `adapter_config.json`. Saved adapters load in PEFT; adapters trained by
//! PEFT load here.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Value as Json, json};

use super::{Adapter, LoraConfig, LoraHyper, Module};
use crate::atomic::{sync_dir, write_temporary};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// The weights' file name in a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The configuration's file name in a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Writes `adapter` as a PEFT adapter folder (created if needed), atomically as far as a pair
/// of files can be: see the comment at the end.
pub fn save(dir: &Path, adapter: &Adapter, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let r = adapter.layout.r;
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for s in &adapter.layout.slots {
        let a = &adapter.params[s.a..s.a + r * s.n_in];
        let b = &adapter.params[s.b..s.b + s.n_out * r];
        bytes.push((adapter.layout.peft_key(s, false), bytemuck::cast_slice(a).to_vec(), vec![r, s.n_in]));
        bytes.push((adapter.layout.peft_key(s, true), bytemuck::cast_slice(b).to_vec(), vec![s.n_out, r]));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::invalid("adapter tensor", format!("{k}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::invalid("adapter", format!("serializing: {e}")))?;
    let c = &adapter.config;
    let modules: BTreeSet<Module> = adapter.layout.slots.iter().map(|s| s.module).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        // A multimodal model's vision tower has modules of the same names: a regex over the
        // language model's, as PEFT writes one.
        "target_modules": match adapter.layout.multimodal() {
            false => json!(modules.iter().map(|m| m.name()).collect::<Vec<_>>()),
            true => json!(format!(
                r".*language_model.*\.({})",
                modules.iter().map(|m| m.name()).collect::<Vec<_>>().join("|")
            )),
        },
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": c.use_rslora,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
        "init_lora_weights": true,
        "peft_version": "0.21.2",
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("adapter config", e.to_string()))?;
    // Both files are written and flushed under temporary names before either is renamed into
    // place, so a failure while writing leaves the folder as it was, and the two renames are
    // the only moment when a kill can pair new weights with the old config.
    let (weights, config) = (dir.join(WEIGHTS_FILE), dir.join(CONFIG_FILE));
    let tmp_weights = write_temporary(&weights, &data)?;
    let tmp_config = write_temporary(&config, text.as_bytes()).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp_weights);
    })?;
    for (tmp, path) in [(&tmp_weights, &weights), (&tmp_config, &config)] {
        std::fs::rename(tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp_weights);
            let _ = std::fs::remove_file(&tmp_config);
            Error::io(path, e)
        })?;
    }
    sync_dir(&weights)
}

/// Loads a PEFT LoRA adapter folder for a model with config `model`.
pub fn load(dir: &Path, model: &ModelConfig) -> Result<Adapter> {
    let cpath = dir.join(CONFIG_FILE);
    let text = crate::files::read_config(&cpath)?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::format(&cpath, format!("invalid JSON: {e}")))?;
    let bad = |what: String| Error::format(&cpath, what);
    if let Some(t) = j.get("peft_type").and_then(Json::as_str)
        && t != "LORA"
    {
        return Err(Error::unsupported(&cpath, format!("peft_type `{t}` (only LORA adapters load)")));
    }
    for (key, ok) in [
        ("use_dora", j.get("use_dora").is_none_or(|v| v.is_null() || v == false)),
        ("bias", j.get("bias").is_none_or(|v| v.is_null() || v == "none")),
        ("fan_in_fan_out", j.get("fan_in_fan_out").is_none_or(|v| v.is_null() || v == false)),
        (
            "modules_to_save",
            j.get("modules_to_save").is_none_or(|v| v.is_null() || v.as_array().is_some_and(|a| a.is_empty())),
        ),
        (
            "rank_pattern",
            j.get("rank_pattern").is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            j.get("alpha_pattern").is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty())),
        ),
    ] {
        if !ok {
            return Err(Error::unsupported(&cpath, format!("`{key}` = {} (plain LoRA only)", j[key])));
        }
    }
    let r = j.get("r").and_then(Json::as_u64).ok_or_else(|| bad("`r` is missing or not an integer".into()))? as usize;
    let alpha = j.get("lora_alpha").and_then(Json::as_f64).unwrap_or(8.0) as f32;
    let dropout = j.get("lora_dropout").and_then(Json::as_f64).unwrap_or(0.0) as f32;
    let use_rslora = j.get("use_rslora").and_then(Json::as_bool).unwrap_or(false);
    LoraConfig { r, alpha, dropout, use_rslora, ..LoraConfig::default() }
        .validate()
        .map_err(|e| Error::format(&cpath, e.to_string()))?;

    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = crate::files::map(&wpath)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&wpath, format!("not safetensors: {e}")))?;
    // Which modules the file adapts, from its keys (target_modules may be a regex), and each
    // matrix's tensor name, parsed once.
    let mut names: HashMap<(usize, Module, bool), &str> = HashMap::new();
    for name in st.names() {
        let parsed = parse_key(name).ok_or_else(|| {
            Error::unsupported(&wpath, format!("tensor `{name}` (expected ...layers.N.<module>.lora_A/lora_B.weight)"))
        })?;
        names.entry(parsed).or_insert(name);
    }
    let present: BTreeSet<(usize, Module)> = names.keys().map(|&(layer, module, _)| (layer, module)).collect();
    let hyper = LoraHyper { r, alpha, dropout, use_rslora };
    Adapter::from_file(&wpath, model, &present, hyper, |layout, s, b| {
        let shape = if b { [s.n_out, r] } else { [r, s.n_in] };
        let name = *names
            .get(&(s.layer, s.module, b))
            .ok_or_else(|| Error::MissingTensor { path: wpath.clone(), tensor: layout.peft_key(s, b) })?;
        let t = st.tensor(name).map_err(|e| Error::format(&wpath, format!("`{name}`: {e}")))?;
        if t.shape() != shape {
            return Err(Error::Shape {
                path: wpath.clone(),
                tensor: name.to_string(),
                actual: t.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        crate::model::weights::decode_floats(t.dtype(), t.data(), &wpath, name)
    })
}

/// (layer, module, is_b) of a PEFT key such as
/// `base_model.model.model.layers.3.mlp.up_proj.lora_B.weight` (an adapter name after
/// `lora_B`, as in `lora_B.default.weight`, is accepted too).
fn parse_key(name: &str) -> Option<(usize, Module, bool)> {
    let parts: Vec<&str> = name.split('.').collect();
    // A multimodal model's vision tower has layers and modules of the same names.
    if parts.iter().any(|p| p.starts_with("vision")) {
        return None;
    }
    let li = parts.iter().position(|&p| p == "layers")?;
    let layer = parts.get(li + 1)?.parse().ok()?;
    let lora = parts.iter().position(|&p| p == "lora_A" || p == "lora_B")?;
    let module_name = *parts.get(lora.checked_sub(1)?)?;
    let module = Module::EVERY.into_iter().find(|m| m.name() == module_name)?;
    if parts.last() != Some(&"weight") {
        return None;
    }
    Some((layer, module, parts[lora] == "lora_B"))
}
