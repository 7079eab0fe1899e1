//! `config.json` and `generation_config.json` of a Hugging Face model folder.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("config.json");
    if let Ok(mut c) = edgetune::model::config::ModelConfig::from_hf_json(path, text) {
        let _ = c.rope_inv_freq();
        let _ = c.parameter_count();
        let _ = c.merge_generation_config(std::path::Path::new("generation_config.json"), text);
    }
});
