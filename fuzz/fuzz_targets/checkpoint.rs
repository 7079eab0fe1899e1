//! A training checkpoint, and the fallback to the one before it.
#![no_main]
mod common;

use edgetune::train::checkpoint::Checkpoint;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (prev, latest) = common::split2(data);
    let dir = common::folder_with(&[("run.ckpt", latest), ("run.ckpt.prev", prev)]);
    let _ = Checkpoint::load_or_previous(&dir.join("run.ckpt"));
});
