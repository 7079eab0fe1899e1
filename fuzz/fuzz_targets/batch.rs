//! The job files of `edgetune batch`: a JSONL file's lines, and one job's JSON (a folder's
//! file), each job's settings overlaid on the shared ones and checked, user ids checked for
//! repeats.
#![no_main]

use std::path::Path;

use edgetune::train::{TrainConfig, jobs};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let base = TrainConfig::default();
    let mut entries = jobs::parse_lines(text, Path::new("jobs/jobs.jsonl"), &base);
    jobs::mark_duplicates(&mut entries);
    let _ = jobs::parse_job(text, Path::new("jobs"), &base);
});
