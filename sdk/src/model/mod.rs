//! Models: configuration, file formats, weights and the Llama-family forward pass.

pub mod config;
pub mod gguf;
pub mod gguf_write;
pub mod hf_gguf;
pub mod llama;
pub mod training;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use config::ModelConfig;
use weights::WeightSource;

/// Opens a model's configuration and weights: a Hugging Face folder (`config.json` +
/// safetensors) or a `.gguf` file.
pub fn open_weights(path: &Path) -> Result<(ModelConfig, WeightSource)> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = crate::files::read_config(&cfg_path)?;
        let mut cfg = ModelConfig::from_hf_json(&cfg_path, &text)?;
        let gen_path = path.join("generation_config.json");
        if gen_path.exists() {
            let text = crate::files::read_config(&gen_path)?;
            cfg.merge_generation_config(&gen_path, &text)?;
        }
        Ok((cfg, WeightSource::open_safetensors_dir(path)?))
    } else {
        let g = gguf::GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&g)?;
        Ok((cfg, WeightSource::Gguf(Box::new(g))))
    }
}

/// The named shapes that benchmarks accept for random weights, with the Hugging Face
/// `config.json` each was copied from.
pub const SHAPES: [(&str, &str); 7] = [
    ("smollm2-135m", include_str!("shapes/smollm2-135m.json")),
    ("qwen2.5-0.5b", include_str!("shapes/qwen2.5-0.5b.json")),
    ("qwen3-0.6b", include_str!("shapes/qwen3-0.6b.json")),
    ("gemma-3-1b", include_str!("shapes/gemma-3-1b.json")),
    ("llama-3.2-1b", include_str!("shapes/llama-3.2-1b.json")),
    ("qwen2.5-1.5b", include_str!("shapes/qwen2.5-1.5b.json")),
    ("llama-3.1-8b", include_str!("shapes/llama-3.1-8b.json")),
];

/// A model shape with random weights (see [`WeightSource::Random`]): `shape` is one of
/// [`SHAPES`] or the path of a `config.json`.
pub fn open_random(shape: &str, seed: u64) -> Result<(ModelConfig, WeightSource)> {
    let label = PathBuf::from(format!("random weights ({shape})"));
    let cfg = match SHAPES.iter().find(|(name, _)| *name == shape) {
        Some((_, json)) => ModelConfig::from_hf_json(&label, json)?,
        None => {
            let path = Path::new(shape);
            if !path.is_file() {
                let names: Vec<&str> = SHAPES.iter().map(|(n, _)| *n).collect();
                return Err(Error::invalid(
                    "random-weights",
                    format!("`{shape}` is neither a named shape ({}) nor a config.json file", names.join(", ")),
                ));
            }
            let text = crate::files::read_config(path)?;
            ModelConfig::from_hf_json(path, &text)?
        }
    };
    Ok((cfg, WeightSource::Random { label, seed }))
}
