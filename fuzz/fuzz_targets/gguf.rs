//! A GGUF file: header, metadata, tensor infos, then the model config, the tokenizer and the
//! weight index built from it, as loading a .gguf model does, and the same bytes as a GGUF LoRA
//! adapter for the tiny model.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = common::folder_with(&[("m.gguf", data)]);
    let path = dir.join("m.gguf");
    if let Ok(g) = edgetune::model::gguf::GgufFile::open(&path) {
        let _ = edgetune::model::config::ModelConfig::from_gguf(&g);
        let _ = edgetune::tokenizer::Tokenizer::from_gguf(&g);
    }
    let _ = edgetune::model::open_weights(&path);
    let _ = edgetune::lora::gguf::load(&path, common::config());
});
