//! Models: configuration, file formats, weights and the Llama-family forward pass.
pub mod config;
pub mod gguf;
pub mod llama;
pub mod training;
pub mod weights;

use std::path::Path;

use crate::error::{Error, Result};
use config::ModelConfig;
use weights::WeightSource;

/// Opens a model's configuration and weights: a Hugging Face folder (`config.json` +
/// safetensors) or a `.gguf` file.
pub fn open_weights(path: &Path) -> Result<(ModelConfig, WeightSource)> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let mut cfg = ModelConfig::from_hf_json(&cfg_path, &text)?;
        let gen_path = path.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::io(&gen_path, e))?;
            cfg.merge_generation_config(&gen_path, &text)?;
        }
        Ok((cfg, WeightSource::open_safetensors_dir(path)?))
    } else {
        let g = gguf::GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&g)?;
        Ok((cfg, WeightSource::Gguf(Box::new(g))))
    }
}
