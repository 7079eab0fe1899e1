//! Benchmarks without a model file: the named shapes, random weights, and the `--json` output
//! of `edgetune bench` and `edgetune bench-train`.

mod common;

use std::process::{Command, Output};

use edgetune::model::{SHAPES, open_random};

fn edgetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgetune-under-test")).args(args).output().expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The parameter counts the model cards and safetensors headers give: a wrong width, depth,
/// head count or vocabulary in a copied config changes them.
#[test]
fn named_shapes_have_their_published_parameter_counts() {
    let published = [
        ("smollm2-135m", 134_515_008),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen3-0.6b", 596_049_920),
        ("gemma-3-1b", 999_885_952),
        ("llama-3.2-1b", 1_235_814_400),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("llama-3.1-8b", 8_030_261_248),
    ];
    assert_eq!(SHAPES.len(), published.len());
    for (name, count) in published {
        let (cfg, _) = open_random(name, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.parameter_count(), count, "{name}");
    }
    let (llama8, _) = open_random("llama-3.1-8b", 0).expect("shape");
    assert!(!llama8.tie_word_embeddings && llama8.rope_scaling.is_some());
    let (qwen, _) = open_random("qwen2.5-0.5b", 0).expect("shape");
    assert!(qwen.qkv_bias && qwen.tie_word_embeddings);
    let (qwen3, _) = open_random("qwen3-0.6b", 0).expect("shape");
    assert!(qwen3.qk_norm && !qwen3.qkv_bias && qwen3.num_heads * qwen3.head_dim == 2 * qwen3.hidden_size);
    // Heads of 256 dims, past the 128 that the blocked attention takes in one walk; five of
    // every six layers slide over 512 keys.
    let (gemma, _) = open_random("gemma-3-1b", 0).expect("shape");
    assert!(gemma.qk_norm && gemma.sandwich_norms && gemma.head_dim == 256 && gemma.sliding_window == Some(512));
}

#[test]
fn random_weights_are_seeded_and_have_the_initializer_spread() {
    let (cfg, src) = open_random("smollm2-135m", 7).expect("shape");
    let name = "model.layers.3.mlp.up_proj.weight";
    let shape = [cfg.intermediate_size, cfg.hidden_size];
    let a = src.get(&cfg, name, &shape).expect("tensor");
    assert_eq!(a, src.get(&cfg, name, &shape).expect("tensor"), "same seed and name, same values");
    let other = src.get(&cfg, "model.layers.4.mlp.up_proj.weight", &shape).expect("tensor");
    assert_ne!(a, other, "another tensor gets other values");
    let (_, reseeded) = open_random("smollm2-135m", 8).expect("shape");
    assert_ne!(a, reseeded.get(&cfg, name, &shape).expect("tensor"), "another seed, other values");
    // Uniform with standard deviation 0.02: |x| <= 0.02·√3, mean 0 and variance 0.0004 to
    // within a few standard errors of the 884,736 samples (mean: 0.02/√n = 2.1e-5; variance:
    // 0.0004·√(0.8/n) = 3.8e-7 for a uniform's fourth moment).
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = a.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
    assert!(a.iter().all(|x| x.abs() <= 0.02 * 3f32.sqrt()), "outside the uniform's range");
    assert!(mean.abs() < 1e-4, "mean {mean}");
    assert!((var - 4e-4).abs() < 2e-6, "variance {var}");
    let norm = src.get(&cfg, "model.layers.0.input_layernorm.weight", &[cfg.hidden_size]).expect("norm");
    assert!(norm.iter().all(|&x| x == 1.0), "norm weights are 1");
    assert!(!src.contains(&cfg, "lm_head.weight"), "tied embeddings: no lm_head");
}

#[test]
fn unknown_shapes_are_refused_with_the_names_that_exist() {
    let e = open_random("llama-9", 0).expect_err("unknown shape").to_string();
    assert!(e.contains("llama-9") && e.contains("smollm2-135m") && e.contains("llama-3.1-8b"), "{e}");
    let out = edgetune(&["bench", "--random-weights", "llama-9"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("random-weights") && err.contains("qwen2.5-0.5b"), "{err}");
    let out = edgetune(&["bench"]);
    assert!(!out.status.success(), "--model or --random-weights is required");
}

/// `bench-train --json` on random weights of the tiny Llama's config: one JSON object whose
/// memory plan adds up and whose counts come from the GPU layer.
#[test]
fn bench_train_and_bench_print_one_json_object_on_random_weights() {
    let cfg = common::fixtures().join("tiny_llama/config.json").display().to_string();
    let out = edgetune(&[
        "bench-train",
        "--random-weights",
        &cfg,
        "--seq",
        "16",
        "--rank",
        "4",
        "--steps",
        "2",
        "--checkpointing",
        "on",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(j["model"].as_str().is_some_and(|m| m.starts_with("random weights")), "{j}");
    assert_eq!(j["seq"], 16);
    assert!(j["adapter"]["name"].as_str().is_some_and(|n| !n.is_empty()), "{j}");
    let modes = j["modes"].as_array().expect("modes");
    assert_eq!(modes.len(), 1);
    let m = &modes[0];
    assert_eq!(m["checkpointing"], true);
    assert_eq!(m["steps"], 2);
    let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k} in {m}"));
    assert!(f("tokens_per_s") > 0.0 && f("cpu_record_ms") > 0.0, "{m}");
    assert!(m["step_ms"]["min"].as_f64() <= m["step_ms"]["median"].as_f64(), "{m}");
    // Every step runs the same kernels: whole dispatches, as many as a step records.
    assert!(f("dispatches_per_step") >= 20.0 && f("dispatches_per_step").fract() == 0.0, "{m}");
    assert_eq!(f("pipelines_created_per_step"), 0.0, "pipelines are compiled once, in the warm-up");
    // Kernel parameters live in the context's ring, the norm is read through its kept staging
    // buffer, and bind groups are made in the first step and reused: a step makes nothing.
    assert_eq!(f("buffers_created_per_step"), 0.0, "{m}");
    assert_eq!(f("bind_groups_created_per_step"), 0.0, "{m}");
    let mem = &m["gpu_memory_bytes"];
    let u = |k: &str| mem[k].as_u64().unwrap_or_else(|| panic!("{k} in {mem}"));
    assert_eq!(u("planned"), u("weights") + u("adapter") + u("workspace") + u("runtime"), "{mem}");
    assert!(u("runtime") >= 4 << 20, "the 4 MiB parameter ring is counted: {mem}");

    // Encoders are submitted every 8 dispatches here, except a decoded token's, which is one
    // submission however many it records. Then one prefill and three tokens more, profiled.
    let out = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
        .args(["bench", "--random-weights", &cfg, "--prompt-tokens", "8", "--decode-tokens", "3", "--json"])
        .arg("--profile")
        .env("EDGETUNE_FLUSH_EVERY", "8")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for k in ["prefill_tokens_per_s", "decode_tokens_per_s", "decode_chained_tokens_per_s", "dispatches_per_token"] {
        assert!(j[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {j}");
    }
    // A decoded token runs in its KV cache's buffers and bind groups, and is one submission of
    // one compute pass.
    assert_eq!(j["allocations_per_token"].as_f64(), Some(0.0), "{j}");
    assert!(j["dispatches_per_token"].as_f64().is_some_and(|d| d > 8.0), "{j}");
    assert_eq!(j["submits_per_token"].as_f64(), Some(1.0), "{j}");
    assert_eq!(j["compute_passes_per_token"].as_f64(), Some(1.0), "{j}");
    // The host's time a token: recording, submitting and waiting, the first what the wall
    // clock leaves of a token's time after the other two, which the context counts.
    let host = &j["host_ms_per_token"];
    let h = |k: &str| host[k].as_f64().unwrap_or_else(|| panic!("{k} in {host}"));
    let token_ms = 1e3 / j["decode_tokens_per_s"].as_f64().expect("decode tokens/s");
    assert!(h("submitting") > 0.0 && h("waiting") > 0.0 && h("recording") > 0.0, "{host}");
    assert!((h("recording") + h("submitting") + h("waiting") - token_ms).abs() <= 1e-6 * token_ms, "{host} {token_ms}");
    // The profiled tokens record what the timed ones did, every dispatch timed, within the
    // wall-clock time around them; the products declare their work.
    assert!(j["profile_timer"].is_string(), "{j}");
    for (pass, tokens) in [("prefill", 8), ("decode", 3)] {
        let p = &j["profile"][pass];
        let kernels = p["kernels"].as_array().unwrap_or_else(|| panic!("{pass} kernels in {j}"));
        let dispatches: u64 = kernels.iter().map(|k| k["dispatches"].as_u64().expect("dispatches")).sum();
        let seconds: f64 = kernels.iter().map(|k| k["seconds"].as_f64().expect("seconds")).sum();
        assert_eq!((p["tokens"].as_u64(), p["dispatches"].as_u64()), (Some(tokens), Some(dispatches)), "{p}");
        let ms = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p}"));
        assert!((ms("kernel_ms") - seconds * 1e3).abs() <= 1e-9 * ms("kernel_ms"), "{p}");
        assert!(ms("kernel_ms") > 0.0 && ms("kernel_ms") <= ms("wall_ms"), "{p}");
        assert!(kernels.iter().any(|k| k["gflop_per_s"].as_f64().is_some_and(|g| g > 0.0)), "{p}");
    }
    let decoded = j["profile"]["decode"]["dispatches"].as_f64().expect("decode dispatches");
    assert_eq!(Some(decoded / 3.0), j["dispatches_per_token"].as_f64(), "{j}");
    // More profiled dispatches than a query set holds (2,048 pairs): its timestamps are read
    // part-way and every dispatch is still counted once.
    let out = edgetune(&[
        "bench",
        "--random-weights",
        &cfg,
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "100",
        "--repeat",
        "1",
        "--profile",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let long: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let per = long["dispatches_per_token"].as_f64().expect("dispatches");
    let decoded = long["profile"]["decode"]["dispatches"].as_f64().expect("decode dispatches");
    assert!(decoded > 2048.0 && decoded == 100.0 * per, "{long}");

    // With an adapter applied, a decoded token runs one more dispatch for each of a layer's
    // inputs that adapted modules read (x A^T of q, k and v at once, of o, of gate and up at
    // once, of down; the B products ride in the base products' epilogues): 4 a layer with every
    // module adapted, and it still allocates nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
        .args(["bench", "--random-weights", &cfg, "--prompt-tokens", "8", "--decode-tokens", "3", "--json"])
        .args(["--lora-rank", "4"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let layers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("config")).expect("JSON");
    let layers = layers["num_hidden_layers"].as_f64().expect("layers");
    assert_eq!((a["lora_rank"].as_u64(), j["lora_modules"].as_f64()), (Some(4), Some(0.0)), "{a}\n{j}");
    assert_eq!(a["lora_modules"].as_f64(), Some(7.0 * layers), "every module adapted: {a}");
    let more = 4.0 * layers;
    assert_eq!(a["dispatches_per_token"].as_f64(), j["dispatches_per_token"].as_f64().map(|d| d + more), "{a}\n{j}");
    assert_eq!(a["allocations_per_token"].as_f64(), Some(0.0), "{a}");
}

/// Split-key decoding over a cache longer than one slice of keys (the portable family, whose
/// plain attention kernel splits): each layer's attention adds one dispatch (the pass that
/// adds the slices) and allocates nothing per token, and `EDGETUNE_SPLIT_KEYS_BELOW=0` turns it
/// off, as the JSON reports.
#[test]
fn split_key_decoding_adds_one_dispatch_a_layer_and_no_allocation() {
    // The tiny Llama's shape (2 layers) with room for 320 positions.
    let tiny = std::fs::read_to_string(common::fixtures().join("tiny_llama/config.json")).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&tiny).expect("JSON");
    config["max_position_embeddings"] = 320.into();
    let layers = config["num_hidden_layers"].as_f64().expect("layers");
    let path = std::env::temp_dir().join(format!("edgetune-split-keys-{}.json", std::process::id()));
    std::fs::write(&path, config.to_string()).expect("config");
    let cfg = path.display().to_string();
    let run = |below: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
            .args(["bench", "--random-weights", &cfg, "--prompt-tokens", "300", "--decode-tokens", "3"])
            .args(["--repeat", "1", "--max-context", "320", "--json"])
            .env("EDGETUNE_KERNELS", "portable")
            .env("EDGETUNE_SPLIT_KEYS_BELOW", below)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("stdout is one JSON object")
    };
    let (split, whole) = (run(""), run("0"));
    assert_eq!(split["split_keys_below"].as_u64(), Some(256), "{split}");
    assert_eq!(whole["split_keys_below"].as_u64(), Some(0), "{whole}");
    let per = |j: &serde_json::Value, k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k} in {j}"));
    assert_eq!(per(&split, "dispatches_per_token"), per(&whole, "dispatches_per_token") + layers, "{split}\n{whole}");
    assert_eq!(per(&split, "allocations_per_token"), 0.0, "{split}");
    let _ = std::fs::remove_file(&path);
}

/// `scripts/bench-gpu.sh`, the one command a machine with a GPU runs (often lent for a fixed
/// time, with no toolchain), run here end to end on a tiny shape so that a change to the CLI or
/// the table breaks it here rather than there: every run gives one JSON line (training in the
/// adapter's family, with wgpu's own shader checks and in the forced family; decoding four
/// ways), each profiled step its file, and the table a row per family or setting and mode and
/// a profile per family or setting. With a budget too small
/// for any run (BUDGET_S), nothing runs, each run is listed as left out, no empty profile is
/// left behind, and the script still ends with its (empty) table.
#[test]
fn the_gpu_bench_script_runs_every_step_and_keeps_to_its_budget() {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-gpu.sh");
    let dir = std::env::temp_dir().join(format!("edgetune-bench-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp folder");
    // The tiny Llama with room for the 2,048-token cache that the decoding runs fill.
    let tiny = std::fs::read_to_string(common::fixtures().join("tiny_llama/config.json")).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&tiny).expect("JSON");
    config["max_position_embeddings"] = 4096.into();
    let shape = dir.join("config.json");
    std::fs::write(&shape, config.to_string()).expect("config");
    let picked = {
        let said = text(&edgetune(&["gpu"]).stdout);
        let line = said.lines().find_map(|l| l.strip_prefix("kernels: ")).expect("a kernels line").to_string();
        line.split_whitespace().next().expect("a family").to_string()
    };
    let forced = if picked == "portable" { "tile128" } else { "portable" };
    // And tile128 with LoRA's narrow products on 64 x 64 blocks (EDGETUNE_NARROW_MAX=0).
    let families = format!("{forced} tile128::0");
    let bench = |out: &std::path::Path, budget: Option<&str>| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(env!("CARGO_BIN_EXE_edgetune-under-test"))
            .envs([
                ("SEQ", "16"),
                ("RANK", "4"),
                ("STEPS", "1"),
                ("TORCH", "0"),
                ("FAMILIES", &families),
                ("CHECKS", "all"),
            ])
            .env("SHAPES", &shape)
            .env("PROFILE", &shape)
            .env("BENCH_OUT", out)
            .env_remove("EDGETUNE_KERNELS");
        if let Some(b) = budget {
            cmd.env("BUDGET_S", b);
        }
        let o = cmd.output().expect("bash runs");
        assert!(o.status.success(), "bench-gpu.sh: {}\n{}", text(&o.stdout), text(&o.stderr));
        (text(&o.stdout), text(&o.stderr))
    };
    let out = dir.join("out");
    let (table, log) = bench(&out, None);
    assert!(!log.contains("failed"), "{log}");
    let lines = std::fs::read_to_string(out.join("edgetune.jsonl")).expect("JSON lines");
    let runs: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let training: Vec<&serde_json::Value> = runs.iter().filter(|r| r.get("modes").is_some()).collect();
    assert_eq!((training.len(), runs.len()), (4, 8), "{lines}");
    let families: Vec<(&str, &str)> = training
        .iter()
        .filter_map(|r| Some((r["kernels"]["family"].as_str()?, r["shader_checks"].as_str()?)))
        .collect();
    assert_eq!(
        families,
        [(picked.as_str(), "bounds"), (picked.as_str(), "all"), (forced, "bounds"), ("tile128", "bounds")],
        "{lines}"
    );
    assert_eq!(training[3]["kernels"]["narrow_max"].as_u64(), Some(0), "{lines}");
    for name in
        ["profile.json", "profile-checks-all.json", &format!("profile-{forced}.json"), "profile-tile128--0.json"]
    {
        let p: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(name)).expect(name)).expect("a profile");
        assert!(p["modes"][0]["profile"].as_array().is_some_and(|k| !k.is_empty()), "{name}: no kernels");
    }
    let rows = |family: &str| table.lines().filter(|l| l.contains(&format!(" | {family} | "))).count();
    let all = format!("{picked}, shader checks all");
    let wide = "tile128, tile64 below 512 tiles, no narrow blocks";
    assert_eq!(
        (rows(&picked), rows(&all), rows(forced), rows(wide)),
        (2, 2, 2, 2),
        "checkpointing on and off each: {table}"
    );
    assert_eq!(table.matches("Profiled step").count(), 4, "{table}");
    assert_eq!(table.matches(" ms in kernels):").count(), 4, "each profiled step's kernels summed: {table}");
    // The first decoding run's profiled prefill and decoding: a table each, the decoding's per
    // token.
    let decode = runs.iter().find(|r| r["prompt_tokens"] == 128).expect("the 128-token decoding run");
    assert_eq!(decode["profile"]["decode"]["tokens"].as_u64(), Some(32), "{decode}");
    assert_eq!(table.matches("Profiled prefill of ").count(), 1, "{table}");
    assert_eq!(table.matches("Profiled decoding, per token, of ").count(), 1, "{table}");
    // RoPE runs once a layer a token: its row of the decoding table says so, not 32 times that.
    let section = table.split("Profiled decoding, per token, of ").nth(1).expect("the decoding table");
    let rope = section.lines().find(|l| l.starts_with("| rope | ")).expect("a rope row");
    let layers = config["num_hidden_layers"].as_u64().expect("layers");
    assert_eq!(rope.split(" | ").nth(3), Some(layers.to_string().as_str()), "{rope}");
    assert_eq!(table.lines().filter(|l| l.contains(" | 2048 | ")).count(), 2, "{table}");
    // Each decoding row gives the host's milliseconds a token: recording / submitting / waiting.
    for row in table.lines().filter(|l| l.contains(" | 2048 | ")) {
        let host: Vec<f64> =
            row.split(" | ").nth(6).expect("a host column").split(" / ").map(|v| v.parse().expect(row)).collect();
        assert!(host.len() == 3 && host.iter().all(|&v| v >= 0.0) && host[2] > 0.0, "{row}");
    }
    // The 8 sequences with their own adapters: one row, which allocated nothing a step.
    let together: Vec<&str> =
        table.lines().filter(|l| l.starts_with(&format!("| {} | 8 | ", shape.display()))).collect();
    assert!(together.len() == 1 && together[0].ends_with(" | 0 |"), "{table}");
    // A budget that no run fits: the ten runs are listed, and nothing is left behind.
    let out = dir.join("none");
    let (table, log) = bench(&out, Some("19"));
    assert!(!log.lines().any(|l| l.starts_with("== ") && !l.starts_with("== done")), "a run started: {log}");
    assert!(table.contains("BUDGET_S=19 ran out before 12 runs, left out:"), "{table}");
    assert!(table.contains(&format!("edgetune bench-train, {forced} kernels")), "{table}");
    assert!(table.contains("edgetune bench-train --profile, shader checks all"), "{table}");
    assert_eq!(std::fs::read_to_string(out.join("edgetune.jsonl")).expect("JSON lines"), "");
    assert!(!out.join("profile.json").exists(), "an empty profile was left");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/gpu-tests.sh run`, which a machine with a GPU runs on test binaries built here,
/// keeps its accounts: each binary runs from the checkout's `tests/` folder with
/// `EDGETUNE_FIXTURES` naming its fixtures, gzipped or not; the summary adds their results;
/// a failing one's output is shown and fails the run; a missing one counts as failed; and
/// with BUDGET_S spent none starts and each is named as left out; the cooperative-matrix
/// kernels that the binaries dispatched on matrix units are named. (The binaries here are
/// small scripts that print a test harness's result line: what is under test is the runner.)
#[test]
fn the_gpu_tests_runner_adds_results_and_keeps_to_its_budget() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/gpu-tests.sh");
    let dir = std::env::temp_dir().join(format!("edgetune-gpu-tests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp folder");
    let tests_dir = root.join("tests").canonicalize().expect("tests folder");
    let fixtures = tests_dir.join("reference/fixtures");
    // Passes only where the runner put it: in tests/, with the fixtures named.
    let good = format!(
        "#!/bin/sh\n[ \"$(pwd -P)\" = '{}' ] && [ \"$EDGETUNE_FIXTURES\" = '{}' ] || exit 3\n\
         echo matmul_t128.coop16 >> \"$EDGETUNE_KERNEL_LOG\"; echo matmul_t128.coop16.emulated >> \"$EDGETUNE_KERNEL_LOG\"\n\
         echo 'test result: ok. 3 passed; 0 failed; 0 ignored'\n",
        tests_dir.display(),
        fixtures.display()
    );
    let bad = "#!/bin/sh\necho 'the failing assertion'\necho 'test result: FAILED. 1 passed; 2 failed;'\nexit 101\n";
    std::fs::write(dir.join("good"), good).expect("write");
    std::fs::write(dir.join("bad"), bad).expect("write");
    let gz = Command::new("gzip").arg("-9").arg(dir.join("bad")).status().expect("gzip runs");
    assert!(gz.success());
    let run = |tests: &str, budget: Option<&str>| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg("run").arg(&dir).env("TESTS", tests);
        if let Some(b) = budget {
            cmd.env("BUDGET_S", b);
        }
        let o = cmd.output().expect("bash runs");
        (o.status.success(), text(&o.stdout))
    };
    let (ok, said) = run("good", None);
    assert!(ok && said.contains("gpu-tests: 3 passed, 0 failed"), "{said}");
    // The kernels its processes dispatched: the one that ran on matrix units is named, its
    // emulated twin is not.
    assert!(said.contains("gpu-tests: 2 kernels dispatched; on the matrix units: matmul_t128.coop16\n"), "{said}");
    let (ok, said) = run("good bad missing", None);
    assert!(!ok && said.contains("gpu-tests: 4 passed, 3 failed"), "{said}");
    assert!(said.contains("the failing assertion") && said.contains("missing: not in"), "{said}");
    let (ok, said) = run("good bad", Some("19"));
    assert!(!ok && said.contains("gpu-tests: 0 passed, 0 failed, 2 binaries left out"), "{said}");
    assert!(said.contains("good: left out, BUDGET_S=19 spent"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench --rows N` decodes N sequences, each with its own adapter, one after another and then
/// together, a step at a time (`Model::decode_rows_argmax`) and chained (`Model::submit_rows_argmax`,
/// each step fed by the picks of the one before on the GPU as greedy generation runs them),
/// then two steps of `Model::decode_rows`, which reads the logits back as sampling does, and
/// reports the rates; a step of the chained run or a sampled one creates
/// nothing, even where the rows' logits are more than the context's kept staging buffer holds
/// (a vocabulary of 100,000: 3 rows of logits are 1.2 MB).
#[test]
fn bench_rows_decodes_sequences_with_their_own_adapters_and_allocates_nothing_a_step() {
    let dir = std::env::temp_dir().join(format!("edgetune-bench-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tiny_llama/config.json")).expect("config"),
    )
    .expect("JSON");
    cfg["vocab_size"] = 100_000.into();
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"))
        .args(["bench", "--random-weights", &path.display().to_string(), "--prompt-tokens", "8"])
        .args(["--decode-tokens", "3", "--rows", "3", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let rows = &j["rows"];
    assert_eq!((rows["sequences"].as_u64(), rows["lora_rank"].as_u64()), (Some(3), Some(16)), "{j}");
    for k in ["alone_tokens_per_s", "together_tokens_per_s", "together_stepwise_tokens_per_s", "speedup"] {
        assert!(rows[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {rows}");
    }
    assert_eq!(rows["allocations_per_step"].as_f64(), Some(0.0), "{rows}");
    // The rows' caches share a pool: a step is one compute pass, the logits read back after it.
    assert_eq!(rows["compute_passes_per_step"].as_f64(), Some(1.0), "{rows}");
    let _ = std::fs::remove_dir_all(&dir);
}
