//! Training settings as TOML (the CLI's --config, batch's base file) and as JSON (the C ABI and
//! Python), then their validation.
#![no_main]

use edgetune::train::TrainConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = toml::from_str::<TrainConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = serde_json::from_str::<TrainConfig>(text) {
        let _ = c.validate();
    }
});
