//! The `edgetune` command line on the tiny Llama: happy paths and bad input.

mod common;

use std::process::{Command, Output};

fn edgetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgetune-under-test")).args(args).output().expect("runs")
}

fn tiny() -> String {
    common::fixtures().join("tiny_llama").display().to_string()
}

/// Runs `edgetune args` (with `--json`), which must succeed, and parses its event lines.
fn json_events(args: &[&str]) -> Vec<serde_json::Value> {
    let out = edgetune(args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON")).collect()
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
    // r 16 on all 7 modules of 2 layers: 16 (64+64)·2 + 16 (64+32)·2 + 16 (64+128)·3 = 16,384
    // values a layer, 32,768 in all: 131,072 bytes, 0.125 MiB.
    assert!(stdout.contains("each resident LoRA adapter (r 16, all linear layers, f32): 0.1 MiB"), "{stdout}");
    // The GPU figures are what loading uploads (Model::planned_weight_bytes, held to the uploaded
    // bytes in model_parity), per weight too: f32 is 32 bits a weight exactly.
    let (cfg, src) = edgetune::model::open_weights(std::path::Path::new(&tiny())).expect("config");
    let nf4 = edgetune::model::llama::Model::planned_weight_bytes(&cfg, &src, &Default::default());
    let bits = nf4 as f64 * 8.0 / cfg.parameter_count() as f64;
    assert!(
        stdout.contains(&format!("GPU weights: nf4 {:.1} MiB, {bits:.2} bits a weight;", nf4 as f64 / 1048576.0)),
        "{stdout}"
    );
    assert!(stdout.contains(", 32.00 bits a weight"), "{stdout}");
    let gemma = common::fixtures().join("tiny_gemma3");
    let out = edgetune(&["info", gemma.to_str().expect("path")]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "q/k norms; norms after attention and the MLP; GeGLU (tanh GELU); sliding window 4 on 5 of 6 layers"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("rope: theta 1000000, linear scaling x2; sliding layers theta 10000"), "{stdout}");
    assert!(!stdout.contains("multimodal"), "{stdout}");
    let mm = common::fixtures().join("tiny_gemma3_mm");
    let out = edgetune(&["info", mm.to_str().expect("path")]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("multimodal: the text model is trained; the vision tower is kept as it is"), "{stdout}");
    assert!(stdout.contains("stored: 114 tensors"), "{stdout}");
    let gemma2 = common::fixtures().join("tiny_gemma2_bpe.gguf");
    let out = edgetune(&["info", gemma2.to_str().expect("path")]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "norms after attention and the MLP; GeGLU (tanh GELU); sliding window 4 on 1 of 2 layers; \
             attention scores soft-capped at 1; logits soft-capped at 1.5"
        ),
        "{stdout}"
    );

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
    assert!(text(&out.stderr).contains("expected nf4, gguf or none"), "{}", text(&out.stderr));
}

/// `merge --format gguf` from a Hugging Face folder writes the library's file (the one
/// tests/llama_cpp.rs holds to llama.cpp's converter and runs in llama.cpp) and a Modelfile
/// naming it; what it cannot write as llama.cpp would read it is refused by name, with
/// nothing written: another family, a sliding window, a SentencePiece-style tokenizer, a
/// pre-tokenizer it cannot name.
#[test]
fn merge_to_gguf_from_a_folder_writes_the_librarys_file_or_refuses_by_name() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let fx = common::fixtures();
    let path = |p: &std::path::Path| p.display().to_string();
    let merge = |model: &std::path::Path, adapter: &str, out: &std::path::Path| {
        let adapter = fx.join(adapter);
        edgetune(&[
            "merge",
            "--model",
            &path(model),
            "--adapter",
            &path(&adapter),
            "--format",
            "gguf",
            "--type",
            "q8_0",
            "--output",
            &path(out),
        ])
    };
    let qwen2 = fx.join("tiny_qwen2");
    let out = dir.join("merged.gguf");
    let run = merge(&qwen2, "peft_qwen2_adapter", &out);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let (cfg, _) = edgetune::model::open_weights(&qwen2).expect("folder");
    let adapter = edgetune::lora::load(&fx.join("peft_qwen2_adapter"), &cfg).expect("adapter");
    let lib = dir.join("library.gguf");
    edgetune::lora::merge::merge_gguf(&qwen2, &adapter, &lib, edgetune::quant::gguf_blocks::GgmlType::Q8_0)
        .expect("merge");
    assert!(
        std::fs::read(&out).expect("cli file") == std::fs::read(&lib).expect("library file"),
        "not the library's file"
    );
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).expect("Modelfile");
    assert!(modelfile.contains("FROM /") && modelfile.contains("merged.gguf"), "{modelfile}");

    let refused = |model: &std::path::Path, adapter: &str, expected: &[&str]| {
        let out = dir.join("refused.gguf");
        let run = merge(model, adapter, &out);
        assert_eq!(run.status.code(), Some(1), "{}", text(&run.stderr));
        let err = text(&run.stderr);
        assert!(expected.iter().all(|e| err.contains(e)), "{err}");
        assert!(!out.exists(), "a refused merge wrote {}", out.display());
    };
    // The tiny Phi-3's tokenizer_config.json names no tokenizer class, which the converter reads.
    refused(&fx.join("tiny_phi3"), "peft_phi3_adapter", &["tiny_phi3/tokenizer_config.json", "no `tokenizer_class`"]);
    // The tiny Gemma's query_pre_attn_scalar (24) is not its heads' width (32), by which
    // llama.cpp's gemma3 scales queries.
    refused(
        &fx.join("tiny_gemma3"),
        "peft_gemma3_adapter",
        &["tiny_gemma3", "gemma3_text folder with query_pre_attn_scalar 24", "1 / sqrt(32)"],
    );
    refused(&fx.join("tiny_mistral"), "peft_mistral_adapter", &["tiny_mistral", "sliding window of"]);
    // tiny Qwen2 with its tokenizer.json changed, one field at a time.
    let edited = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let folder = dir.join(name);
        common::copy_files(&qwen2, &folder);
        let file = folder.join("tokenizer.json");
        let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
        edit(&mut t);
        std::fs::write(&file, t.to_string()).expect("write");
        folder
    };
    let spm = edited("spm", &|t| t["model"]["byte_fallback"] = true.into());
    refused(&spm, "peft_qwen2_adapter", &["spm/tokenizer.json", "byte fallback", "convert_hf_to_gguf.py"]);
    let split = edited("split", &|t| {
        t["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    });
    refused(
        &split,
        "peft_qwen2_adapter",
        &["split/tokenizer.json", "pre_tokenizer for a GGUF file: {\"type\":\"Whitespace\"}"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_with_json_events_then_export_and_use_the_adapter() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let persona = common::fixtures().join("../../../sdk/data/persona");
    let data = persona.join("train.jsonl").display().to_string();
    let config = persona.join("train.toml").display().to_string();
    let out_dir = dir.join("run").display().to_string();
    // The config file gives the system message; the flags ask for 3 steps.
    let args = [
        "train",
        "--model",
        &tiny(),
        "--data",
        &data,
        "--config",
        &config,
        "--output",
        &out_dir,
        "--json",
        "--max-steps",
        "3",
        "--batch-tokens",
        "128",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--max-len",
        "128",
        "--eval-every",
        "3",
        "--activations",
        "f16",
        "--lr",
        "0.005",
    ];
    let out = edgetune(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["started", "step", "step", "step", "eval", "checkpoint", "finished"], "{events:?}");
    let step = &events[1];
    for key in ["loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "gpu_memory_bytes", "epoch"] {
        assert!(step[key].is_number(), "step event lacks {key}: {step}");
    }
    assert_eq!(events[6]["reason"], "completed");
    let run = dir.join("run");
    let settings = std::fs::read_to_string(run.join("train_config.toml")).expect("settings written");
    // The flags and the file's system message are recorded; epochs do not matter with max_steps.
    assert!(settings.contains("max_steps = 3") && settings.contains("Answer as yourself"), "{settings}");
    assert!(settings.contains("activations = \"f16\""), "{settings}");

    // Export the checkpoint's best adapter: the same bytes the run saved.
    let exported = dir.join("exported").display().to_string();
    let ckpt = run.join("checkpoint.safetensors").display().to_string();
    let out = edgetune(&["export", "--model", &tiny(), "--checkpoint", &ckpt, "--output", &exported]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let read = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).expect("adapter file");
    assert_eq!(read(&run.join("adapter")), read(&dir.join("exported")));

    // The adapter changes what the model predicts.
    let file = dir.join("q.txt");
    std::fs::write(&file, "What is your name? My name is Juniper.").expect("write");
    let loss = |extra: &[&str]| -> f32 {
        let (f, model) = (file.display().to_string(), tiny());
        let mut a = vec!["eval", "--model", &model, "--text", &f];
        a.extend_from_slice(extra);
        let out = edgetune(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s = text(&out.stdout);
        s.lines().find_map(|l| l.strip_prefix("mean token loss: ")).and_then(|v| v.parse().ok()).expect("loss")
    };
    let adapter = run.join("adapter").display().to_string();
    let with_peft = loss(&["--adapter", &adapter]);
    assert_ne!(loss(&[]), with_peft);

    // The same adapter as a GGUF LoRA file, from the checkpoint and from the folder: f32 tensors
    // hold the same values, so the loss is the same to the bit.
    let export_gguf = |source: &str, path: &str, out: &str| {
        let model = tiny();
        let out = edgetune(&[
            "export", "--model", &model, source, path, "--format", "gguf", "--type", "f32", "--output", out,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let gguf = dir.join("adapter.gguf").display().to_string();
    export_gguf("--adapter", &adapter, &gguf);
    assert_eq!(loss(&["--adapter", &gguf]), with_peft);
    let gguf2 = dir.join("from-checkpoint.gguf").display().to_string();
    export_gguf("--checkpoint", &ckpt, &gguf2);
    assert_eq!(std::fs::read(&gguf).expect("gguf"), std::fs::read(&gguf2).expect("gguf"));
    // An Ollama Modelfile beside it names the base and the adapter.
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).expect("Modelfile");
    assert!(
        modelfile.contains("\nFROM /") && modelfile.contains("ADAPTER /") && modelfile.contains("from-checkpoint.gguf"),
        "{modelfile}"
    );
    // Training continues from the GGUF adapter: its first step starts from the trained loss,
    // below a fresh adapter's (which starts as the base model).
    let first_loss = |extra: &[&str], out_dir: &str| -> f64 {
        let mut a: Vec<&str> = args[..args.len() - 2].to_vec();
        a.retain(|x| !["--rank", "4", "--alpha", "8"].contains(x));
        let i = a.iter().position(|x| *x == "--output").expect("output") + 1;
        a[i] = out_dir;
        let j = a.iter().position(|x| *x == "--max-steps").expect("steps") + 1;
        a[j] = "1";
        a.extend_from_slice(extra);
        let out = edgetune(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let step = text(&out.stdout).lines().find(|l| l.contains("\"step\"")).map(str::to_owned).expect("a step event");
        serde_json::from_str::<serde_json::Value>(&step).expect("JSON")["loss"].as_f64().expect("loss")
    };
    let (cont, fresh) = (dir.join("cont").display().to_string(), dir.join("fresh1").display().to_string());
    let continued = first_loss(&["--init-adapter", &gguf], &cont);
    let from_scratch = first_loss(&["--rank", "4"], &fresh);
    assert!(continued < from_scratch, "continued {continued} vs fresh {from_scratch}");
    let settings = std::fs::read_to_string(dir.join("cont/train_config.toml")).expect("settings");
    assert!(settings.contains("r = 4"), "{settings}");
    let out = edgetune(&[
        "train",
        "--model",
        &tiny(),
        "--data",
        &data,
        "--output",
        &cont,
        "--init-adapter",
        &gguf,
        "--rank",
        "8",
    ]);
    assert_ne!(out.status.code(), Some(0), "--rank with --init-adapter is refused");

    // Several adapters resident at once: each prompt answered by each, as each alone answers.
    let fixture = common::fixtures().join("peft_llama_adapter").display().to_string();
    let generate = |adapters: &[&str]| {
        let model = tiny();
        let mut a = vec!["generate", "--model", &model, "--prompt", "Paris is", "--max-tokens", "5"];
        for x in adapters {
            a.extend(["--adapter", x]);
        }
        let out = edgetune(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let (one, two) = (generate(&[&adapter]), generate(&[&fixture]));
    assert_ne!(one, two, "the two adapters must answer differently");
    let both = generate(&[&adapter, &fixture]);
    assert_eq!(both, format!("> Paris is\n[{adapter}]\n{one}[{fixture}]\n{two}\n"));
    let out = edgetune(&[
        "eval",
        "--model",
        &tiny(),
        "--text",
        &file.display().to_string(),
        "--adapter",
        &adapter,
        "--adapter",
        &fixture,
    ]);
    assert_eq!(out.status.code(), Some(1), "only generate takes several adapters");

    let out = edgetune(&["export", "--model", &tiny(), "--output", &gguf2]);
    assert_ne!(out.status.code(), Some(0), "export needs a checkpoint or an adapter");
    // The model file itself is not an adapter.
    let out = edgetune(&["eval", "--model", &tiny(), "--text", &file.display().to_string(), "--adapter", &tiny()]);
    assert_eq!(out.status.code(), Some(1));

    // Bad settings and a missing checkpoint are named.
    let mut bad = args[..args.len() - 2].to_vec();
    bad.push("--lr=-1");
    let out = edgetune(&bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("learning_rate must be a finite number > 0 (got -1)"), "{}", text(&out.stderr));
    let mut bad = args[..args.len() - 4].to_vec();
    bad.extend(["--activations", "f8"]);
    let out = edgetune(&bad);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("expected f32 or f16, got \"f8\""), "{}", text(&out.stderr));
    let fresh = dir.join("fresh").display().to_string();
    let out = edgetune(&["train", "--model", &tiny(), "--data", &data, "--output", &fresh, "--resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("checkpoint.safetensors"), "{}", text(&out.stderr));
}

/// A reader that closes the pipe early ends `edgetune` quietly (as `head` ends other tools),
/// never with a panic.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
        .args(["info", &tiny()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    // Close the reading end before the command writes (it opens the model first).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waits");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success() || out.status.signal() == Some(libc_sigpipe()), "{:?}: {err}", out.status);
}

#[cfg(unix)]
fn libc_sigpipe() -> i32 {
    13 // SIGPIPE on Linux, macOS and the BSDs
}

/// Ctrl-C (SIGINT) during `train` stops after the step under way, saves the checkpoint and the
/// adapter so far, and exits with 130; `--resume` then finishes the run, with the adapter an
/// uninterrupted run gives.
/// `train --quant gguf` keeps a GGUF's Q4_0 and Q4_1 blocks for training: the first step's loss
/// differs from NF4's (which re-quantizes them) and the run trains. It is the default: without
/// `--quant` the first loss is the kept blocks' to the bit.
#[test]
fn train_takes_the_quant_of_the_base() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-quant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = common::fixtures().join("../../../sdk/data/persona/train.jsonl").display().to_string();
    let gguf = common::fixtures().join("tiny_qwen2_bpe.gguf").display().to_string();
    let first_loss = |quant: &str| {
        let out_dir = dir.join(quant).display().to_string();
        let args = ["train", "--model", &gguf, "--data", &data, "--output", &out_dir, "--json", "--max-steps", "2"];
        let chosen: &[&str] = if quant == "default" { &[] } else { &["--quant", quant] };
        let out = edgetune(&[&args[..], &["--batch-tokens", "128", "--max-len", "64"], chosen].concat());
        assert!(out.status.success(), "{quant}: {}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|e| e["loss"].as_f64().filter(|_| e["event"] == "step"))
            .unwrap_or_else(|| panic!("{quant}: no step event"))
    };
    let (kept, nf4) = (first_loss("gguf"), first_loss("nf4"));
    eprintln!("first step's loss: gguf {kept}, nf4 {nf4}");
    assert!(kept.is_finite() && (kept - nf4).abs() > 1e-6, "gguf {kept} vs nf4 {nf4}");
    assert_eq!(first_loss("default").to_bits(), kept.to_bits(), "the default holds the file's blocks");
    let out = edgetune(&["train", "--model", &gguf, "--data", &data, "--output", "x", "--quant", "int3"]);
    assert!(!out.status.success() && text(&out.stderr).contains("expected nf4, gguf or none"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_interrupted_by_sigint_resumes_to_the_same_adapter() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = std::env::temp_dir().join(format!("edgetune-cli-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = common::fixtures().join("../../../sdk/data/persona/train.jsonl").display().to_string();
    let args = |out: &str| -> Vec<String> {
        let fixed = ["--max-steps", "24", "--batch-tokens", "128", "--rank", "4", "--max-len", "128", "--lr", "0.005"];
        let mut v: Vec<String> = ["train", "--model", &tiny(), "--data", &data, "--output", out, "--json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(fixed.iter().map(|s| s.to_string()));
        v
    };
    let run = dir.join("run").display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
        .args(args(&run))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let pid = child.id().to_string();
    let mut finished = serde_json::Value::Null;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let event: serde_json::Value = serde_json::from_str(&line.expect("a line")).expect("JSON");
        if event["event"] == "step" && event["step"] == 2 {
            assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill runs").success());
        }
        if event["event"] == "finished" {
            finished = event;
        }
    }
    let status = child.wait().expect("exits");
    assert_eq!(status.code(), Some(130), "an interrupted run exits with 130");
    assert_eq!(finished["reason"], "cancelled", "{finished}");
    let stopped = finished["step"].as_u64().expect("step");
    assert!((2..24).contains(&stopped), "stopped at {stopped}");
    let run_dir = dir.join("run");
    assert!(run_dir.join("checkpoint.safetensors").exists() && run_dir.join("adapter").exists());

    let mut resume = args(&run);
    resume.push("--resume".into());
    let resumed = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test")).args(&resume).output().expect("runs");
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let first = text(&resumed.stdout).lines().next().unwrap_or_default().to_string();
    let started: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(started["start_step"], stopped, "the resumed run starts where the first stopped");

    let whole = dir.join("whole").display().to_string();
    let straight = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test")).args(args(&whole)).output().expect("runs");
    assert!(straight.status.success(), "{}", text(&straight.stderr));
    let read = |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).expect("adapter");
    assert_eq!(read(&run_dir), read(&dir.join("whole")), "resumed and uninterrupted adapters differ");
}

/// With no settings, `train` prints what it chose from the data and records it in
/// train_config.toml; that file repeats the run byte for byte. `eval --data` scores the
/// assistant turns as training's validation does.
#[test]
fn train_chooses_settings_from_the_data_records_them_and_eval_data_scores_like_validation() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let facts = common::fixtures().join("../../data/facts/train.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&facts).expect("facts").lines().map(String::from).collect();
    let (train, held) = (dir.join("train.jsonl"), dir.join("held.jsonl"));
    std::fs::write(&train, lines[..12].join("\n")).expect("write");
    std::fs::write(&held, lines[12..].join("\n")).expect("write");
    let (train, held) = (train.display().to_string(), held.display().to_string());
    let run1 = dir.join("run1");
    let r1 = run1.display().to_string();
    let small = ["--rank", "4", "--alpha", "8", "--max-len", "96"];
    let model = tiny();
    let mut args = vec!["train", "--model", &model, "--data", &train, "--val-data", &held, "--output", &r1];
    args.extend(small);
    let out = edgetune(&args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("chosen from the data"), "{err}");
    let settings = std::fs::read_to_string(run1.join("train_config.toml")).expect("settings written");
    for key in ["batch_tokens", "epochs", "learning_rate", "warmup_steps", "keep_best"] {
        let printed = err
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} not printed: {err}"));
        let value = printed.split(' ').next().expect("value");
        assert!(settings.contains(&format!("#   {key} = {value} (")), "{key} not listed as chosen: {settings}");
        let line = settings
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} not recorded: {settings}"));
        let recorded = line.trim_start_matches(&format!("{key} = "));
        let same = recorded == value
            || recorded.parse::<f64>().ok() == value.parse::<f64>().ok() && value.parse::<f64>().is_ok();
        assert!(same, "{key}: printed {value}, recorded {recorded}");
    }
    // The conversations rule is printed, listed and recorded under [data] like the others.
    let printed = err.lines().find_map(|l| l.trim().strip_prefix("data.chain = ")).expect("data.chain printed");
    let chain = printed.split(' ').next().expect("value");
    assert!(settings.contains(&format!("#   data.chain = {chain} (")), "{settings}");
    assert!(settings.contains(&format!("\nchain = {chain}\n")), "{settings}");
    assert!(settings.contains("keep_best = true"), "the user's own validation file keeps the best adapter: {settings}");
    assert!(settings.contains("val_data = "), "{settings}");

    // The recorded file alone repeats the run: nothing left to choose but the split, and the
    // same adapter bytes.
    let run2 = dir.join("run2");
    let r2 = run2.display().to_string();
    let cfg = run1.join("train_config.toml").display().to_string();
    let events =
        json_events(&["train", "--model", &tiny(), "--data", &train, "--config", &cfg, "--output", &r2, "--json"]);
    let chosen: Vec<&str> =
        events[0]["chosen"].as_array().expect("chosen").iter().filter_map(|c| c["setting"].as_str()).collect();
    assert_eq!(chosen, ["validation"], "{}", events[0]);
    let read = |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).expect("adapter");
    assert_eq!(read(&run1), read(&run2), "the recorded settings did not repeat the run");
    let best = events.iter().rev().find_map(|e| e["best_val_loss"].as_f64()).expect("a best validation loss") as f32;

    // eval --data on the validation file with the kept (best) adapter: the validation loss that
    // training reported, through the inference path instead of the training workspace. Both sum
    // the same ~100 f32 token losses in another order and run the same kernels on other buffer
    // shapes, so they agree to f32 rounding, far inside 1e-3.
    let adapter = run1.join("adapter").display().to_string();
    let out = edgetune(&["eval", "--model", &tiny(), "--adapter", &adapter, "--data", &held]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value = |prefix: &str| -> f32 {
        let l = stdout.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("{prefix}: {stdout}"));
        l.trim().trim_start_matches("mean loss ").split(',').next().and_then(|v| v.parse().ok()).expect("a number")
    };
    let (base, tuned) = (value("base:"), value("adapter:"));
    assert!((tuned - best).abs() <= 1e-3 * best, "eval --data {tuned} vs training's validation loss {best}");
    assert_ne!(base, tuned);
    assert!(stdout.contains("4 samples"), "{stdout}");
}

/// The kill test: `train` (a checkpoint every step) is killed with SIGKILL at 21 points chosen
/// by a seeded generator, each a random delay of up to 80 ms after a random step or checkpoint
/// event of that life, so kills land inside steps and inside checkpoint writes; each time the
/// next life resumes from what is on disk. After every kill, what is on disk must read back
/// whole (a checkpoint, or the one before it), no temporary file may be mistaken for one, and
/// it must hold the uninterrupted run's parameters, AdamW moments, best adapter so far and state
/// at its step, bit for bit (so a failure names the life that strayed, where it started and how
/// it was killed). The last life runs to the end, and its adapter (the best by validation loss:
/// the persona data validates on 4 restated records) must be the uninterrupted run's, byte for
/// byte.
#[cfg(unix)]
#[test]
fn train_killed_at_random_points_resumes_to_the_same_adapter() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    use edgetune::train::checkpoint::Checkpoint;

    let dir = std::env::temp_dir().join(format!("edgetune-cli-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = common::fixtures().join("../../../sdk/data/persona/train.jsonl").display().to_string();
    let args = |out: &std::path::Path, resume: bool| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--model", &tiny(), "--data", &data, "--json", "--checkpoint-every", "1"]
            .iter()
            .chain(&["--max-steps", "96", "--batch-tokens", "128", "--rank", "4", "--max-len", "128", "--lr", "0.005"])
            .map(|s| s.to_string())
            .collect();
        v.extend(["--output".to_string(), out.display().to_string()]);
        if resume {
            v.push("--resume".into());
        }
        v
    };
    // `train` into `out`, its events on a pipe.
    let spawn = |out: &std::path::Path, resume: bool| {
        Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
            .args(args(out, resume))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("runs")
    };
    // The uninterrupted run, with its state after each step it checkpoints: copied as each
    // checkpoint event comes (the copy may catch a later step's; its own step says which).
    let whole = dir.join("whole");
    let mut straight = spawn(&whole, false);
    let mut states = std::collections::BTreeMap::new();
    let copy = dir.join("copy.safetensors");
    for line in BufReader::new(straight.stdout.take().expect("stdout")).lines() {
        let Ok(line) = line else { break };
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        if event["event"] == "checkpoint"
            && std::fs::copy(whole.join("checkpoint.safetensors"), &copy).is_ok()
            && let Ok(ck) = Checkpoint::load(&copy)
        {
            states.insert(ck.state.step, ck);
        }
    }
    assert!(straight.wait().expect("exits").success(), "the uninterrupted run failed");
    assert!(states.len() >= 24, "only {} of its 96 checkpoints were copied", states.len());
    // Where a life's checkpoint departs from the uninterrupted run's at the same step.
    let departs = |ck: &Checkpoint| -> Option<String> {
        let same = states.get(&ck.state.step)?;
        let differ = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        let (p, m, v) = (differ(&ck.params, &same.params), differ(&ck.m, &same.m), differ(&ck.v, &same.v));
        // The best adapter so far (keep_best: the final adapter is this one), or which has none.
        let best = match (&ck.best, &same.best) {
            (Some(a), Some(b)) => differ(a, b),
            (a, b) => usize::from(a.is_some() != b.is_some()) * ck.params.len(),
        };
        (ck.state != same.state || p + m + v + best > 0).then(|| {
            format!(
                "step {}: {p} parameters, {m} first and {v} second moments, {best} of the best adapter, of {} differ; \
                 state {:?} vs {:?}",
                ck.state.step,
                ck.params.len(),
                ck.state,
                same.state
            )
        })
    };

    let run = dir.join("killed");
    let ckpt = run.join("checkpoint.safetensors");
    let seed = 20261130u64;
    let mut rng = seed;
    let mut next = |n: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let (mut kills, mut lives) = (Vec::new(), 0);
    loop {
        lives += 1;
        assert!(lives <= 80, "no progress after {lives} lives (kills at {kills:?})");
        let resume = ckpt.exists() || edgetune::atomic::previous(&ckpt).exists();
        let mut child = spawn(&run, resume);
        // This life's kill point: after the k-th step or checkpoint event it reports, plus a delay.
        let target = if kills.len() < 21 { Some((1 + next(4), next(80))) } else { None };
        let mut seen = 0;
        let mut last_event = String::new();
        let mut began = String::new();
        let mut killed = false;
        for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
            let Ok(line) = line else { break };
            let event: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            last_event = format!("{} {}", event["event"], event["step"]);
            // Where the life started, and whether from the checkpoint before the last.
            if event["event"] == "started" {
                began = format!("from step {}", event["start_step"]);
            } else if event["event"] == "warning"
                && event["message"].as_str().is_some_and(|m| m.contains("the checkpoint before it"))
            {
                began.push_str(" (the one before)");
            }
            if event["event"] == "step" || event["event"] == "checkpoint" {
                seen += 1;
            }
            if let Some((after, delay_ms)) = target
                && seen == after
                && !killed
            {
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                child.kill().expect("SIGKILL");
                killed = true;
                kills.push(format!("{began}: {last_event} +{delay_ms} ms"));
            }
        }
        let status = child.wait().expect("exits");
        if !killed || status.success() {
            assert!(status.success(), "the last life failed ({status}) after {last_event}");
            if !killed {
                break;
            }
        }
        // Whatever the kill interrupted, a whole checkpoint can be read, and it holds what the
        // uninterrupted run held at its step: a life that strays is named where it does.
        if ckpt.exists() || edgetune::atomic::previous(&ckpt).exists() {
            let (ck, _) =
                Checkpoint::load_or_previous(&ckpt).unwrap_or_else(|e| panic!("after the kill at {last_event}: {e}"));
            if let Some(how) = departs(&ck) {
                panic!(
                    "life {lives} (kills so far {kills:?}) left a checkpoint unlike the uninterrupted run's at {how}"
                );
            }
        }
    }
    eprintln!("seed {seed}: {} kills over {lives} lives: {kills:?}", kills.len());
    assert!(kills.len() >= 20, "only {} kills landed", kills.len());
    let (last, _) = Checkpoint::load_or_previous(&ckpt).expect("the last life's checkpoint");
    assert_eq!(last.state.step, 96);
    if let Some(how) = departs(&last) {
        panic!("the last life ended unlike the uninterrupted run, at {how}");
    }
    let read = |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).expect("adapter");
    assert_eq!(read(&run), read(&whole), "the killed and resumed run's adapter differs from the uninterrupted one");
    let leftovers: Vec<String> = std::fs::read_dir(&run)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.len() <= 1, "temporary files of dead writers pile up: {leftovers:?}");
}

/// `eval --data --generate` answers each record's question with the base model and with the
/// adapter, exactly as `generate --chat` answers it, and scores each answer against the
/// record's own; a record whose answer is what the base model says scores an exact match.
#[test]
fn eval_generate_answers_each_record_and_scores_it_against_its_own_answer() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-answers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let adapter = common::fixtures().join("peft_llama_adapter").display().to_string();
    let record = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    let questions = ["Where do you live?", "What is your name?"];
    let held = dir.join("held.jsonl");
    let lines = [record(questions[0], "On the island of Skelmar."), record(questions[1], "Juniper.")];
    std::fs::write(&held, lines.join("\n") + "\n").expect("write");
    let (tiny, held_s) = (tiny(), held.display().to_string());
    let eval = |data: &str, report: &std::path::Path| -> serde_json::Value {
        let r = report.display().to_string();
        let args = ["eval", "--model", &tiny, "--quant", "none", "--data", data, "--generate", "--max-tokens", "6"];
        let out = edgetune(&[&args[..], &["--adapter", &adapter, "--report", &r]].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("base   : exact match ") && stdout.contains("adapter: exact match "), "{stdout}");
        serde_json::from_str(&std::fs::read_to_string(report).expect("report written")).expect("report JSON")
    };
    let report = eval(&held_s, &dir.join("report.json"));
    let answers = report["answers"].as_array().expect("answers");
    assert_eq!(answers.len(), 2);
    let score_of = |v: &serde_json::Value| -> [f64; 3] {
        ["exact", "f1", "rouge_l"].map(|k| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}")))
    };
    let mut sums = [[0.0; 3]; 2];
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["line"], i + 1);
        assert_eq!(a["question"], questions[i]);
        let reference = a["reference"].as_str().expect("reference");
        for (k, (who, scores)) in [("base", "base_scores"), ("adapter", "adapter_scores")].into_iter().enumerate() {
            let said = a[who].as_str().unwrap_or_else(|| panic!("{who} answer in {a}"));
            // The same answer as generate --chat gives, with and without the adapter.
            let mut args = vec!["generate", "--model", &tiny, "--quant", "none", "--chat", "--max-tokens", "6"];
            args.extend(["--prompt", questions[i]]);
            if who == "adapter" {
                args.extend(["--adapter", &adapter]);
            }
            let out = edgetune(&args);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), format!("{said}\n"), "record {}: the {who}'s answer", i + 1);
            let s = edgetune::score::AnswerScores::of(said, reference);
            assert_eq!(score_of(&a[scores]), [s.exact, s.f1, s.rouge_l], "record {}: {who} scores", i + 1);
            for (sum, v) in sums[k].iter_mut().zip([s.exact, s.f1, s.rouge_l]) {
                *sum += v;
            }
        }
    }
    for (k, who) in ["base", "adapter"].into_iter().enumerate() {
        let mean = score_of(&report[who]);
        for (m, sum) in mean.iter().zip(sums[k]) {
            assert!((m - sum / 2.0).abs() < 1e-12, "{who} means {mean:?}, sums {:?}", sums[k]);
        }
    }

    // The base model's own answer as the reference: an exact match, F1 1.
    let said = answers[0]["base"].as_str().expect("base answer");
    let own = dir.join("own.jsonl");
    std::fs::write(&own, record(questions[0], said) + "\n").expect("write");
    let again = eval(&own.display().to_string(), &dir.join("own.json"));
    assert_eq!(again["answers"][0]["base"], said, "greedy answers repeat");
    assert_eq!(score_of(&again["base"])[..2], [1.0, 1.0], "{again}");

    // A plain text has no answer to score against: the file and line are named.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, lines[0].clone() + "\n{\"text\": \"just text\"}\n").expect("write");
    let out = edgetune(&["eval", "--model", &tiny, "--data", &bad.display().to_string(), "--generate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.jsonl") && err.contains("line 2") && err.contains("no reference answer"), "{err}");
}

/// `train --method dpo` on preference pairs with the user's held-out pairs: every step and
/// evaluation carries TRL's rewards, and `eval --data` on the held-out pairs with the kept adapter
/// gives the rewards the best evaluation reported (the reference is the base for a new adapter).
#[test]
fn train_method_dpo_reports_rewards_and_eval_data_ranks_held_out_pairs_as_training_did() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-dpo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let qa = [
        ("Where do you live?", "By the sea.", "In a very large city far away from any water at all."),
        ("What is your cat called?", "Pixel.", "I do not have a cat, and I never had one either."),
        ("What do you drink?", "Tea.", "Mostly coffee, sometimes juice, and on weekends milk."),
        ("When do you wake up?", "At six.", "Whenever I feel like it, usually around noon or later."),
        ("What do you read?", "Old maps.", "I do not read much, but sometimes a magazine."),
        ("What is your hobby?", "Sailing.", "Watching television for many hours every evening."),
        ("What is your colour?", "Green.", "It changes every day, so I cannot really say."),
        ("Who is your friend?", "Bo.", "I am not sure I have any friends at the moment."),
    ];
    let pair = |(q, good, bad): &(&str, &str, &str)| {
        serde_json::json!({"prompt": q, "chosen": format!(" {good}"), "rejected": format!(" {bad}")}).to_string()
    };
    let lines: Vec<String> = qa.iter().map(pair).collect();
    let (train, held) = (dir.join("pairs.jsonl"), dir.join("held.jsonl"));
    std::fs::write(&train, lines[..6].join("\n")).expect("write");
    std::fs::write(&held, lines[6..].join("\n")).expect("write");
    let (train, held) = (train.display().to_string(), held.display().to_string());
    let run = dir.join("run").display().to_string();
    let model = tiny();
    let args = [
        "train",
        "--model",
        &model,
        "--data",
        &train,
        "--val-data",
        &held,
        "--output",
        &run,
        "--method",
        "dpo",
        "--max-steps",
        "6",
        "--lr",
        "0.01",
        "--eval-every",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--json",
    ];
    let events = json_events(&args);
    let of = |kind: &'static str| events.iter().filter(move |e| e["event"] == kind);
    assert_eq!(of("step").count(), 6);
    assert!(of("step").all(|e| e["rewards"]["margins"].is_number()), "steps carry rewards");
    let best = of("eval").rfind(|e| e["improved"] == true).expect("an evaluation improved").clone();
    let settings = std::fs::read_to_string(dir.join("run/train_config.toml")).expect("settings");
    assert!(settings.contains("method = \"dpo\"") && settings.contains("reference = \"precomputed\""), "{settings}");

    let adapter = dir.join("run/adapter").display().to_string();
    let out = edgetune(&["eval", "--model", &model, "--adapter", &adapter, "--data", &held]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("2 preference pairs"), "{stdout}");
    let value = |key: &str| -> f64 {
        let rest = stdout.split(key).nth(1).unwrap_or_else(|| panic!("{key}: {stdout}"));
        rest.split_whitespace().next().and_then(|v| v.trim_end_matches(',').parse().ok()).expect("a number")
    };
    // The same log-probabilities through the inference path instead of the training workspace:
    // sums of a few dozen f32 token losses in another order, within 1e-4 of the log-probability
    // (near 100 here, so 1e-2 absolute) times beta = 0.1 for a reward.
    let want = |k: &str| best["rewards"][k].as_f64().expect(k);
    for (key, field) in [("rewards chosen", "chosen"), ("rejected", "rejected"), ("margin", "margins")] {
        let (got, w) = (value(key), want(field));
        assert!((got - w).abs() <= 2e-3, "{key}: eval --data {got} vs training's evaluation {w}");
    }
    assert_eq!(value("accuracy"), want("accuracies"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `train --score-answers FILE` answers FILE's records at each evaluation: every `eval` event
/// carries the base's and the adapter's mean scores, the last one those `eval --generate` gives
/// for the final adapter; a file with nothing to score is refused, naming its line, before any
/// training.
#[test]
fn train_score_answers_scores_the_held_out_answers_at_each_evaluation() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-train-answers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let record = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    let facts = [
        ("Where do you live?", "By the sea."),
        ("What is your cat called?", "Pixel."),
        ("What do you drink?", "Tea."),
        ("When do you wake up?", "At six."),
        ("What is your hobby?", "Sailing."),
        ("Who is your friend?", "Bo."),
    ];
    let model = tiny();
    // The held-out answers are the base model's own (as generate --chat gives them), so the
    // base scores an exact match on each, at every evaluation.
    let base_answer = |q: &str| {
        let out =
            edgetune(&["generate", "--model", &model, "--quant", "none", "--chat", "--max-tokens", "6", "--prompt", q]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim_end_matches('\n').to_string()
    };
    let mut lines: Vec<String> = facts[..4].iter().map(|(q, a)| record(q, a)).collect();
    lines.extend(facts[4..].iter().map(|(q, _)| record(q, &base_answer(q))));
    let (train, held) = (dir.join("train.jsonl"), dir.join("held.jsonl"));
    std::fs::write(&train, lines[..4].join("\n")).expect("write");
    std::fs::write(&held, lines[4..].join("\n")).expect("write");
    let (train, held) = (train.display().to_string(), held.display().to_string());
    let run = dir.join("run").display().to_string();
    let args = [
        "train",
        "--model",
        &model,
        "--quant",
        "none",
        "--data",
        &train,
        "--val-data",
        &held,
        "--output",
        &run,
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--lr",
        "0.01",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--keep-best",
        "false",
        "--score-answers",
        &held,
        "--score-max-tokens",
        "6",
        "--json",
    ];
    let events = json_events(&args);
    let evals: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "eval").collect();
    assert_eq!(evals.iter().map(|e| e["step"].as_u64()).collect::<Vec<_>>(), [Some(2), Some(4)]);
    let scores = |v: &serde_json::Value| ["exact", "f1", "rouge_l"].map(|k| v[k].as_f64().expect(k));
    for e in &evals {
        let base = scores(&e["answers"]["base"]);
        assert_eq!((base[0], base[1]), (1.0, 1.0), "the base says the references: {e}");
    }

    let adapter = dir.join("run/adapter").display().to_string();
    let report = dir.join("report.json").display().to_string();
    let eval = [
        "eval",
        "--model",
        &model,
        "--quant",
        "none",
        "--adapter",
        &adapter,
        "--data",
        &held,
        "--generate",
        "--max-tokens",
        "6",
        "--report",
        &report,
    ];
    let out = edgetune(&eval);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    assert_eq!(scores(&evals[1]["answers"]["adapter"]), scores(&r["adapter"]), "the final adapter's scores");
    assert_eq!(scores(&evals[1]["answers"]["base"]), scores(&r["base"]), "the base's scores");

    // Plain text has no reference answer: refused with its line before training starts.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{}\n{{\"text\": \"just prose\"}}\n", lines[4])).expect("write");
    let bad = bad.display().to_string();
    let mut args = args.to_vec();
    let at = args.iter().position(|a| *a == "--score-answers").expect("flag") + 1;
    args[at] = &bad;
    let out = edgetune(&args);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
    assert!(!events.is_empty() && !text(&out.stdout).contains("\"step\""), "no step ran: {}", text(&out.stdout));
    std::fs::remove_dir_all(&dir).ok();
}

/// `--gpu '#N'` picks an adapter by its index (for several GPUs of one name); an index past the
/// adapters, or one that is no number, is an error that lists the adapters present.
#[test]
fn gpu_by_index() {
    let first = edgetune(&["--gpu", "#0", "gpu"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let by_name = edgetune(&["gpu"]);
    let line = |o: &Output| text(&o.stdout).lines().next().unwrap_or_default().to_string();
    assert_eq!(line(&first), line(&by_name), "#0 is the only adapter here");
    for (bad, says) in [("#99", "with index 99"), ("#x", "expected #N")] {
        let out = edgetune(&["--gpu", bad, "gpu"]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says) && err.contains("present"), "{bad}: {err}");
    }
}

/// `EDGETUNE_NO_SUBGROUPS=1` opens the device without subgroup operations: `edgetune gpu` says
/// so, the family that needs them (simd8) cannot be forced, and a value other than 0 or 1 is
/// refused naming the variable.
#[test]
fn gpu_opens_without_subgroups_when_the_environment_asks() {
    let gpu = |value: &str, kernels: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"));
        cmd.arg("gpu").env("EDGETUNE_NO_SUBGROUPS", value).env_remove("EDGETUNE_KERNELS");
        if let Some(k) = kernels {
            cmd.env("EDGETUNE_KERNELS", k);
        }
        cmd.output().expect("runs")
    };
    let out = gpu("1", None);
    let said = text(&out.stdout);
    assert!(out.status.success() && said.contains("subgroups false") && !said.contains("kernels: simd8"), "{said}");
    let out = gpu("1", Some("simd8"));
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("needs a CPU adapter with 8-lane subgroups"), "{err}");
    let out = gpu("yes", None);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("EDGETUNE_NO_SUBGROUPS") && err.contains("\"yes\""), "{err}");
}

/// `EDGETUNE_SHADER_CHECKS` sets the checks wgpu adds to the kernels: `edgetune gpu` reports
/// the setting (bounds by default), and a name that is not one is refused naming the variable
/// and the names it takes.
#[test]
fn gpu_reports_the_shader_checks_the_environment_asks_for() {
    let gpu = |value: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"));
        cmd.arg("gpu").env_remove("EDGETUNE_SHADER_CHECKS");
        if let Some(v) = value {
            cmd.env("EDGETUNE_SHADER_CHECKS", v);
        }
        cmd.output().expect("runs")
    };
    for (value, says) in [(None, "bounds"), (Some("all"), "all"), (Some(" None "), "none"), (Some("bounds"), "bounds")]
    {
        let out = gpu(value);
        let said = text(&out.stdout);
        assert!(out.status.success() && said.contains(&format!("shader checks: {says}\n")), "{value:?}: {said}");
    }
    let out = gpu(Some("off"));
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("EDGETUNE_SHADER_CHECKS") && err.contains("all, bounds, none"),
        "{err}"
    );
}

/// `EDGETUNE_TILE128_MIN_GROUPS` sets the grid below which tile128 products run on 64 x 64
/// blocks (tile64), which `edgetune gpu` reports with the family; a value that is no number is refused
/// naming the variable.
#[test]
fn gpu_reports_the_tile128_grid_threshold_from_the_environment() {
    let gpu = |groups: &str| {
        Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
            .arg("gpu")
            .env("EDGETUNE_KERNELS", "tile128")
            .env("EDGETUNE_TILE128_MIN_GROUPS", groups)
            .output()
            .expect("runs")
    };
    let out = gpu("64");
    let said = text(&out.stdout);
    assert!(
        out.status.success()
            && said.contains("kernels: tile128")
            && said.contains("fewer than 64 128 x 128 tiles on 64 x 64 (tile64)"),
        "{said}"
    );
    let out = gpu("0");
    let said = text(&out.stdout);
    assert!(out.status.success() && !said.contains("fewer than"), "0 keeps tile128 everywhere: {said}");
    let out = gpu("many");
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("EDGETUNE_TILE128_MIN_GROUPS") && err.contains("\"many\""), "{err}");
}

/// `EDGETUNE_NARROW_MAX` sets the widest side of a product that tile128 runs on its narrow
/// blocks, which `edgetune gpu` reports (0: none); a value that is no number is refused naming
/// the variable.
#[test]
fn gpu_reports_the_narrow_blocks_side_from_the_environment() {
    let gpu = |side: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"));
        cmd.arg("gpu").env("EDGETUNE_KERNELS", "tile128").env_remove("EDGETUNE_NARROW_MAX");
        if let Some(side) = side {
            cmd.env("EDGETUNE_NARROW_MAX", side);
        }
        cmd.output().expect("runs")
    };
    for (side, says) in [(None, "48"), (Some("32"), "32")] {
        let out = gpu(side);
        let said = text(&out.stdout);
        let want = format!("LoRA's products (a side of at most {says}) on 256 x 16 blocks");
        assert!(out.status.success() && said.contains(&want), "{side:?}: {said}");
    }
    let out = gpu(Some("0"));
    let said = text(&out.stdout);
    assert!(out.status.success() && !said.contains("256 x 16"), "0 runs no narrow blocks: {said}");
    let out = gpu(Some("wide"));
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("EDGETUNE_NARROW_MAX") && err.contains("\"wide\""), "{err}");
}

/// `EDGETUNE_KERNEL_LOG` names a file to which a process appends the name of each kernel it
/// dispatches, once (what `scripts/test.sh` holds to every kernel): a prompt and a few decoded
/// tokens on the tiny Llama with the portable family write the kernels of a prefill and of
/// decoding, each once, each a kernel of this build; a file that cannot be written is an
/// error naming the variable and the path, not a run that goes uncounted.
#[test]
fn the_kernel_log_names_each_kernel_a_run_dispatched_once() {
    let dir = std::env::temp_dir().join(format!("edgetune-kernel-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let log = dir.join("kernels.txt");
    let generate = |log: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
            .args(["generate", "--model", &tiny(), "--prompt", "Paris is", "--max-tokens", "4", "--quant", "none"])
            .env("EDGETUNE_KERNELS", "portable")
            .env("EDGETUNE_KERNEL_LOG", log)
            .output()
            .expect("runs")
    };
    let out = generate(&log);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = std::fs::read_to_string(&log).expect("the log was written");
    let mut names: Vec<&str> = said.lines().collect();
    for n in &names {
        assert!(edgetune::gpu::shaders::ALL_SHADERS.iter().any(|s| s.name == *n), "{n:?} is no kernel: {said}");
    }
    // The prompt's many-row products and the decoded tokens' one-row ones, attention, and
    // greedy sampling on the GPU.
    for k in ["embedding", "rms_norm", "matmul", "rope", "attention", "silu_mul", "matvec", "argmax"] {
        assert!(names.contains(&k), "{k} missing: {said}");
    }
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "a kernel was logged twice: {said}");

    let missing = dir.join("no-such-folder").join("kernels.txt");
    let out = generate(&missing);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("EDGETUNE_KERNEL_LOG") && err.contains("no-such-folder"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kernel-coverage` (the last check of `scripts/test.sh`) passes a log that names every kernel
/// lavapipe can run, and fails naming what is missing: a kernel no test dispatched, and with
/// `--gpu` the cooperative-matrix kernels that only matrix units run; a line that names no
/// kernel of this build fails naming its file and line.
#[test]
fn the_kernel_coverage_check_names_the_kernels_no_test_dispatched() {
    use edgetune::gpu::shaders::ALL_SHADERS;
    let dir = std::env::temp_dir().join(format!("edgetune-kernel-coverage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let check = |args: &[&str], lines: &[&str]| {
        let log = dir.join("log.txt");
        std::fs::write(&log, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_kernel-coverage")).args(args).arg(&log).output().expect("runs");
        (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
    };
    let runs: Vec<&str> = ALL_SHADERS.iter().filter(|s| !s.uses_cooperative_matrix()).map(|s| s.name).collect();
    let coop: Vec<&str> = ALL_SHADERS.iter().filter(|s| s.uses_cooperative_matrix()).map(|s| s.name).collect();
    assert!(!coop.is_empty() && runs.contains(&"dropout") && runs.contains(&"matmul_t128.coop16.emulated"));
    // Every one, some twice (several processes share the log).
    let twice: Vec<&str> = runs.iter().chain(&runs[..3]).copied().collect();
    let (ok, said) = check(&[], &twice);
    assert!(ok && said.contains(&format!("{0} of the {0} kernels lavapipe can run", runs.len())), "{said}");
    let without: Vec<&str> = runs.iter().copied().filter(|n| *n != "dropout").collect();
    let (ok, said) = check(&[], &without);
    assert!(!ok && said.contains("1 never dispatched by the tests: dropout"), "{said}");
    let (ok, said) = check(&["--gpu"], &runs);
    assert!(!ok && said.contains(&format!("{} never dispatched", coop.len())) && said.contains(coop[0]), "{said}");
    let mut unknown = runs.clone();
    unknown.insert(1, "matmul_t256");
    let (ok, said) = check(&[], &unknown);
    assert!(!ok && said.contains("line 2: \"matmul_t256\" is no kernel of this build"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `generate` with several prompts and adapters decodes them together (`--rows` at a time,
/// here 4 of the 6 answers, so a prompt's two answers fall in different groups), printing each
/// prompt with each adapter's answer in order: each answer is what that prompt alone with that
/// adapter alone gives.
#[test]
fn several_prompts_with_several_adapters_answer_each_as_alone() {
    let dir = std::env::temp_dir().join(format!("edgetune-cli-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let prompts = ["Paris is", "The cat sat", "One, two,"];
    let file = dir.join("prompts.txt");
    std::fs::write(&file, prompts.join("\n") + "\n").expect("prompts");
    let adapters =
        ["peft_llama_adapter", "export_trl_llama_adapter"].map(|a| common::fixtures().join(a).display().to_string());
    let model = tiny();
    let run = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", &model, "--max-tokens", "5"];
        a.extend(extra);
        let out = edgetune(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let mut want = String::new();
    for p in prompts {
        want += &format!("> {p}\n");
        for a in &adapters {
            want += &format!("[{a}]\n{}", run(&["--prompt", p, "--adapter", a]));
        }
        want += "\n";
    }
    let f = file.display().to_string();
    let got = run(&["--prompts-file", &f, "--adapter", &adapters[0], "--adapter", &adapters[1], "--rows", "4"]);
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(&dir);
}
