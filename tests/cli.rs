//! The `edgetune` command line on the tiny Llama: happy paths and bad input.

mod common;

use std::process::{Command, Output};

fn edgetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgetune")).args(args).output().expect("runs")
}

fn tiny() -> String {
    common::fixtures().join("tiny_llama").display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn info_generate_and_eval_work() {
    let out = edgetune(&["info", &tiny()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("architecture: llama (2 layers, hidden 64, heads 4/2 kv"), "{stdout}");
    assert!(stdout.contains("F32"), "{stdout}");

    let out =
        edgetune(&["generate", "--model", &tiny(), "--prompt", "Paris is", "--max-tokens", "4", "--quant", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("Paris is"), "{}", text(&out.stdout));

    let out = edgetune(&["generate", "--model", &tiny(), "--chat", "--prompt", "Hi", "--max-tokens", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let dir = std::env::temp_dir().join(format!("edgetune-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("text.txt");
    std::fs::write(&file, "Paris is the capital of France.").expect("write");
    let out = edgetune(&["eval", "--model", &tiny(), "--text", &file.display().to_string(), "--quant", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let loss: f32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mean token loss: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {stdout}"));
    assert!(loss.is_finite() && loss > 0.0 && stdout.contains("perplexity: "), "{stdout}");
}

#[test]
fn bad_input_exits_non_zero_with_a_named_reason() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bin = dir.join("latin1.txt");
    std::fs::write(&bin, b"caf\xe9 au lait").expect("write");
    let out = edgetune(&["eval", "--model", &tiny(), "--text", &bin.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("latin1.txt") && err.contains("not UTF-8") && err.contains("offset 3"), "{err}");

    let out = edgetune(&["generate", "--model", &tiny(), "--prompt", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("invalid prompt: is empty"), "{}", text(&out.stderr));

    let missing = dir.join("no-such-model.gguf");
    let out = edgetune(&["generate", "--model", &missing.display().to_string(), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no-such-model.gguf"), "{}", text(&out.stderr));

    let out = edgetune(&["generate", "--model", &tiny(), "--prompt", "x", "--quant", "int3"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("expected nf4 or none"), "{}", text(&out.stderr));
}
