//! `tokenizer_config.json` (special tokens, the chat template) next to the tiny model's
//! tokenizer.json, then the chat template rendered on a conversation.
#![no_main]
mod common;

use edgetune::tokenizer::{Message, Tokenizer};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let tokenizer = std::fs::read(common::tiny().join("tokenizer.json")).expect("tiny tokenizer");
    let dir = common::folder_with(&[("tokenizer.json", &tokenizer), ("tokenizer_config.json", data)]);
    if let Ok(t) = Tokenizer::from_hf_dir(&dir) {
        let messages = [Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello")];
        let _ = t.apply_chat_template(&messages, true);
    }
});
