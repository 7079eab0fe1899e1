//! What the targets share: a scratch folder of this process, and the tiny test model's files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch folder for this process (libFuzzer's -fork and -jobs run several at once).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("edgetune-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch folder");
        d
    })
}

/// Writes `bytes` to `name` in a fresh sub-folder of the scratch folder and returns the folder.
pub fn folder_with(files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch().join("case");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("case folder");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("write case file");
    }
    dir
}

/// The repository's tiny Llama fixture.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures/tiny_llama")
}

/// The tiny model's tokenizer, loaded once.
pub fn tokenizer() -> &'static edgetune::tokenizer::Tokenizer {
    static TOK: OnceLock<edgetune::tokenizer::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| edgetune::tokenizer::Tokenizer::open(&tiny()).expect("tiny tokenizer"))
}

/// The tiny model's config, loaded once.
pub fn config() -> &'static edgetune::model::config::ModelConfig {
    static CFG: OnceLock<edgetune::model::config::ModelConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let path = tiny().join("config.json");
        let text = std::fs::read_to_string(&path).expect("tiny config");
        edgetune::model::config::ModelConfig::from_hf_json(&path, &text).expect("tiny config parses")
    })
}

/// Splits an input in two at its first two bytes (a little-endian length of the first part).
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}
