//! Which kernels a test run dispatched: reads the files that `EDGETUNE_KERNEL_LOG` named while
//! the tests ran (each line the name of a kernel a GPU context dispatched) and fails, naming
//! them, if any kernel that this adapter kind can run was never dispatched. Every kernel runs
//! on lavapipe but the cooperative-matrix ones, which need a GPU's matrix units (their
//! emulated twins run instead); with `--gpu` those count too, for a run on a GPU that has them.
//!
//! `kernel-coverage [--gpu] LOG...`

use edgetune::gpu::shaders;
use std::collections::BTreeSet;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut gpu = false;
    let mut logs = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--gpu" => gpu = true,
            _ if a.starts_with('-') => {
                return fail(&format!("unknown option {a:?}; usage: kernel-coverage [--gpu] LOG..."));
            }
            _ => logs.push(a),
        }
    }
    if logs.is_empty() {
        return fail("no log given; usage: kernel-coverage [--gpu] LOG...");
    }
    let mut ran = BTreeSet::new();
    for log in &logs {
        let text = match std::fs::read_to_string(log) {
            Ok(t) => t,
            Err(e) => return fail(&format!("cannot read {log}: {e}")),
        };
        for (i, line) in text.lines().enumerate() {
            if !shaders::ALL_SHADERS.iter().any(|s| s.name == line) {
                return fail(&format!("{log}, line {}: {line:?} is no kernel of this build", i + 1));
            }
            ran.insert(line.to_owned());
        }
    }
    let (expected, gpu_only): (Vec<&shaders::Shader>, Vec<&shaders::Shader>) =
        shaders::ALL_SHADERS.iter().partition(|s| gpu || !s.uses_cooperative_matrix());
    let missing: Vec<&str> = expected.iter().map(|s| s.name).filter(|n| !ran.contains(*n)).collect();
    println!(
        "{} of the {} kernels {} can run were dispatched{}",
        expected.len() - missing.len(),
        expected.len(),
        if gpu { "a GPU with matrix units" } else { "lavapipe" },
        if gpu_only.is_empty() {
            String::new()
        } else {
            format!(" ({} cooperative-matrix kernels need a GPU's matrix units)", gpu_only.len())
        }
    );
    if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        fail(&format!("{} never dispatched by the tests: {}", missing.len(), missing.join(", ")))
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("kernel-coverage: {message}");
    ExitCode::FAILURE
}
