//! A PEFT adapter folder (adapter_config.json and adapter_model.safetensors) for the tiny model.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (config, weights) = common::split2(data);
    let dir = common::folder_with(&[("adapter_config.json", config), ("adapter_model.safetensors", weights)]);
    let _ = edgetune::lora::peft::load(&dir, common::config());
});
