//! A Hugging Face model folder's weights: a safetensors file, or (when the input starts with
//! `{`) a sharded index naming files, with the tiny model's config.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let config = std::fs::read(common::tiny().join("config.json")).expect("tiny config");
    let dir = if data.first() == Some(&b'{') {
        let (index, shard) = common::split2(&data[1..]);
        common::folder_with(&[
            ("config.json", &config),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00001.safetensors", shard),
        ])
    } else {
        common::folder_with(&[("config.json", &config), ("model.safetensors", data)])
    };
    let _ = edgetune::model::open_weights(&dir);
});
