//! Training records in every format (JSON, JSONL, Alpaca, ShareGPT, OpenAI chat, text), as the
//! C ABI and Python hand them over, tokenized with the tiny model's tokenizer and template.
#![no_main]
mod common;

use edgetune::data::{DataConfig, Source, load_sources};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let records = text.lines().map(str::to_string).collect();
    let cfg = DataConfig { max_len: 256, val_fraction: Some(0.25), ..Default::default() };
    let _ = load_sources(&[Source::Records { name: "records".into(), records }], common::tokenizer(), &cfg);
    let dir = common::folder_with(&[("data.json", data)]);
    let _ = edgetune::data::load(&dir.join("data.json"), common::tokenizer(), &cfg);
});
