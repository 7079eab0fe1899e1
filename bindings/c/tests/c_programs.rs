//! Compiles the C programs in this folder with the system C compiler against the library and
//! runs them on the tiny test model (on the GPU adapter wgpu finds: lavapipe in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::run;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The folder holding the libedgetune.so built with this test binary: target/<profile>/deps,
/// next to it (cargo does not always copy it up to target/<profile>).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps").to_path_buf();
    let candidates = [deps.clone(), deps.parent().unwrap_or(&deps).to_path_buf()];
    candidates
        .iter()
        .find(|d| d.join("libedgetune.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "no libedgetune.so in {} or its parent: build it first with `cargo build -p edgetune-capi` \
                 (scripts/test.sh does)",
                deps.display()
            )
        })
        .clone()
}

fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-c-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// Compiles tests/NAME.c into the work folder and returns the executable.
fn compile(name: &str, work: &Path) -> PathBuf {
    compile_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/{name}.c")), name, work)
}

fn compile_file(source: &Path, name: &str, work: &Path) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = work.join(name);
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg("-I")
        .arg(here.join("include"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-ledgetune", "-lpthread", "-lm"])
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(out.status.success(), "compiling {name}.c:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

fn tiny_model() -> String {
    repo().join("tests/reference/fixtures/tiny_llama").display().to_string()
}

fn persona() -> String {
    repo().join("sdk/data/persona/train.jsonl").display().to_string()
}

#[test]
fn train_save_load_generate_cycle() {
    let work = work_dir("cycle");
    let exe = compile("cycle", &work);
    let out = run(Command::new(&exe).args([tiny_model(), persona()]).arg(&work), "cycle");
    assert!(out.contains("cycle: ok"));
}

/// The same cycle under valgrind's memcheck: no invalid read or write, no use of uninitialised
/// memory, nothing definitely lost. "Possibly lost" blocks do not fail the run: they are
/// process-wide statics built once and kept until exit (minijinja's built-in filters and tests,
/// tokenizers' byte tables, a regex cache), reached through pointers into their middle. Nor do blocks that
/// Mesa's lavapipe allocates and loses inside its own pipeline creation (`tests/lavapipe.supp`).
/// Slow: about 15 minutes of one core where Mesa's shader cache is cold, most of it lavapipe
/// compiling the kernels under valgrind; `scripts/test.sh` runs it on its own, beside the other
/// tests, as soon as the test binaries are built (and skips it in its `cargo test`).
#[test]
fn the_cycle_runs_clean_under_valgrind() {
    let work = work_dir("valgrind");
    let exe = compile("cycle", &work);
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--show-leak-kinds=definite",
        "--error-exitcode=97",
        "--num-callers=40",
    ])
    // Blocks lavapipe itself loses inside its pipeline creation are the driver's (see the file).
    .arg(format!("--suppressions={}/tests/lavapipe.supp", env!("CARGO_MANIFEST_DIR")))
    .arg(&exe)
    .args([tiny_model(), persona()])
    .arg(&work);
    let out = cmd.output().unwrap_or_else(|e| panic!("running valgrind ({e}): install it (scripts/setup.sh does)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("valgrind cycle:\n{stdout}{stderr}");
    assert!(out.status.success(), "valgrind found errors or the cycle failed ({})", out.status);
    assert!(stdout.contains("cycle: ok"));
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "valgrind's report is missing");
    let no_leak = stderr.contains("definitely lost: 0 bytes") || stderr.contains("no leaks are possible");
    assert!(no_leak, "valgrind reports a leak");
}

#[test]
fn cancel_from_a_second_thread() {
    let work = work_dir("cancel");
    let exe = compile("cancel", &work);
    let out = run(Command::new(&exe).args([tiny_model(), persona()]).arg(&work), "cancel");
    assert!(out.contains("cancel: ok"));
}

#[test]
fn every_error_path_is_a_status_and_a_message() {
    let work = work_dir("errors");
    let exe = compile("errors", &work);
    let out = run(Command::new(&exe).args([tiny_model(), persona()]).arg(&work), "errors");
    assert!(out.contains("errors: ok"));
}

/// The example a C developer copies builds with the documented flags and runs as documented.
#[test]
fn the_example_builds_and_runs() {
    let work = work_dir("example");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/personalize.c");
    let exe = compile_file(&source, "personalize", &work);
    let out = run(Command::new(&exe).args([tiny_model(), persona()]).arg(work.join("adapter")), "personalize");
    assert!(out.contains("training completed") && out.contains("PEFT adapter written to"), "{out}");
    assert!(work.join("adapter/adapter_model.safetensors").exists());
}
