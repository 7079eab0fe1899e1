//! `edgetune export-job --to trl`, judged by TRL itself: `tests/reference/export_job.py` exported
//! the same jobs, ran the exported `train.py` (TRL 1.16's SFTTrainer, f32 on the CPU) and kept
//! what TRL's collator handed the model, TRL's ten-step curve, the adapter it wrote and PEFT's
//! logits with that adapter. These tests export again and hold edgetune to all of it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use common::{Fixture, assert_close, fixtures};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::lora::{GpuAdapter, peft};
use edgetune::model::llama::{LoadOptions, Model, Quant};
use serde_json::Value;

/// The jobs of the generator: name, model, the export's own arguments.
const CASES: [(&str, &str, &[&str]); 2] = [
    ("llama", "tiny_llama", &["--grad-accum", "2"]),
    ("qwen2", "tiny_qwen2_bpe.gguf", &["--gpus", "2", "--rank", "8", "--rslora"]),
];

fn edgetune(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgetune-under-test")).args(args).output().expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn persona() -> PathBuf {
    fixtures().join("../../../sdk/data/persona/train.jsonl")
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgetune-export-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The generator's arguments (shared by export and train), as it recorded them, and the
/// export's own ones (`--to`, `--gpus`).
fn args(fx: &Fixture) -> (Vec<String>, Vec<String>) {
    let all: Vec<String> = serde_json::from_str(&fx.metadata("args")).expect("args");
    let (mut train, mut export) = (Vec::new(), Vec::new());
    let mut it = all.into_iter();
    while let Some(flag) = it.next() {
        let value = if flag == "--rslora" { None } else { it.next() };
        let to = if flag == "--to" || flag == "--gpus" { &mut export } else { &mut train };
        to.push(flag);
        to.extend(value);
    }
    (train, export)
}

fn export(name: &str, model: &str) -> (Fixture, PathBuf, Vec<String>) {
    let fx = Fixture::open(&format!("export_trl_{name}_expected.safetensors"));
    let (train, own) = args(&fx);
    let dir = scratch(name).join("job");
    let mut a: Vec<String> = vec!["export-job".into(), "--model".into(), fixtures().join(model).display().to_string()];
    a.extend(["--data".into(), persona().display().to_string(), "--output".into(), dir.display().to_string()]);
    a.extend(train.iter().cloned().chain(own));
    let out = edgetune(&a);
    assert!(out.status.success(), "{name}: export-job failed: {}", text(&out.stderr));
    (fx, dir, train)
}

fn read_json_lines(path: &Path) -> Vec<Value> {
    let t = std::fs::read_to_string(path).expect("rows");
    t.lines().map(|l| serde_json::from_str(l).expect("JSON row")).collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("integer")).collect()
}

/// What TRL's data loader and collator gave the model for each row of the job TRL ran (its ids,
/// labels and the positions that keep packed samples apart) is what this export writes, and the
/// export is the job TRL ran: the same rows, starting adapter and settings.
#[test]
fn the_exported_rows_are_what_trls_collator_hands_the_model() {
    for (name, model, _) in CASES {
        let (fx, dir, _) = export(name, model);
        let rows = read_json_lines(&dir.join("data/train.jsonl"));
        let job: Value = serde_json::from_slice(&std::fs::read(dir.join("job.json")).expect("job.json")).expect("job");
        let mut want: Value = serde_json::from_str(&fx.metadata("job")).expect("job");
        // Absolute paths of the machine that made the fixture.
        want["base"]["path"] = job["base"]["path"].clone();
        want["base"]["source"] = job["base"]["source"].clone();
        assert_eq!(job, want, "{name}: job.json differs from the job TRL ran");
        assert_eq!(job["data"]["rows"].as_u64(), Some(rows.len() as u64));
        assert_eq!(rows.len() as u64 % job["data"]["rows_per_step"].as_u64().expect("rows a step"), 0);
        for (i, row) in rows.iter().enumerate() {
            let ids = ints(&row["input_ids"]);
            assert_eq!(ids, fx.i64(&format!("row{i}.input_ids")), "{name} row {i}: ids");
            // TRL's collator also masks each sample's first token, which is never trained here.
            assert_eq!(ints(&row["labels"]), fx.i64(&format!("row{i}.labels")), "{name} row {i}: labels");
            let positions: Vec<i64> = ints(&row["seq_lengths"]).iter().flat_map(|&n| 0..n).collect();
            assert_eq!(positions, fx.i64(&format!("row{i}.position_ids")), "{name} row {i}: positions");
        }
        let script = std::fs::read_to_string(dir.join("train.py")).expect("train.py");
        assert!(
            script == fx.metadata("train_py"),
            "{name}: train.py changed since TRL ran it: run the generator again"
        );
        let init = std::fs::read(dir.join("init_adapter").join(peft::WEIGHTS_FILE)).expect("init adapter");
        let a = safetensors::SafeTensors::deserialize(&init).expect("safetensors");
        assert!(a.names().iter().any(|n| n.contains("lora_A")), "{name}: the starting adapter holds A matrices");
        let _ = std::fs::remove_dir_all(dir.parent().expect("scratch"));
    }
}

/// `edgetune train` with the same arguments takes the steps TRL took on the exported job: the
/// same loss and gradient norm at each of the ten steps (f32 on both sides).
#[test]
fn edgetune_trains_the_exported_job_as_trl_does() {
    for (name, model, _) in CASES {
        let fx = Fixture::open(&format!("export_trl_{name}_expected.safetensors"));
        let (train, _) = args(&fx);
        takes_the_steps_of(&format!("TRL {name}"), &fx, model, &train);
    }
    // The job exported for 2 GPUs, run by TRL on 2 processes (accelerate; each process takes its
    // rows of every step): the same steps.
    let fx = Fixture::open("export_trl_qwen2_ddp_expected.safetensors");
    assert_eq!(fx.metadata("processes"), "2");
    let (train, export) = args(&fx);
    assert_eq!(export, ["--to", "trl", "--gpus", "2"]);
    takes_the_steps_of("TRL qwen2 on 2 processes", &fx, "tiny_qwen2_bpe.gguf", &train);
}

/// The default job, a 4-bit NF4 base: TRL with bitsandbytes (0.50, on the CPU, so its products
/// run in f32 on the dequantized NF4 weights) took the steps edgetune takes on the same NF4
/// weights. What differs beyond summation order is edgetune's f16 embedding and lm_head tables:
/// each value rounded by at most 2^-11 of itself, which moves a logit by at most 2^-11 times
/// sum |h_i w_i| (about 5e-4 here: hidden 64, |h| about 1, |w| about 0.02) and the loss by twice
/// that, 1e-3 absolute on losses near 6: inside the curve's bound of 1e-3 relative (measured:
/// 7e-6).
#[test]
fn edgetune_trains_the_4_bit_job_as_trl_and_bitsandbytes_do() {
    let fx = Fixture::open("export_trl_llama_nf4_expected.safetensors");
    let dir = scratch("nf4").join("job");
    let all: Vec<String> = serde_json::from_str(&fx.metadata("args")).expect("args");
    let model = fixtures().join("tiny_llama").display().to_string();
    let mut a: Vec<String> = vec!["export-job".into(), "--model".into(), model];
    a.extend(["--data".into(), persona().display().to_string(), "--output".into(), dir.display().to_string()]);
    a.extend(all.iter().cloned());
    let out = edgetune(&a);
    assert!(out.status.success(), "export-job failed: {}", text(&out.stderr));
    let job: Value = serde_json::from_slice(&std::fs::read(dir.join("job.json")).expect("job.json")).expect("job");
    assert_eq!((job["base"]["nf4"].as_bool(), job["base"]["double_quant"].as_bool()), (Some(true), Some(false)));
    let script = std::fs::read_to_string(dir.join("train.py")).expect("train.py");
    assert!(script == fx.metadata("train_py"), "train.py changed since TRL ran it: run the generator again");
    let _ = std::fs::remove_dir_all(dir.parent().expect("scratch"));
    let train: Vec<String> = all.iter().skip(2).cloned().collect();
    assert_eq!(all[..2], ["--to", "trl"]);
    takes_the_steps_of("TRL + bitsandbytes llama nf4", &fx, "tiny_llama", &train);
}

/// Runs `edgetune train` on `model` with the persona data and `args`, and holds its ten steps to
/// the curve in `fx` (`what` ran it): loss, gradient norm and learning rate at each step.
fn takes_the_steps_of(what: &str, fx: &Fixture, model: &str, args: &[String]) {
    let dir = scratch(&format!("{}-train", what.replace(' ', "-")));
    let mut a: Vec<String> = vec!["train".into(), "--model".into(), fixtures().join(model).display().to_string()];
    a.extend(["--data".into(), persona().display().to_string(), "--output".into(), dir.display().to_string()]);
    a.extend(args.iter().cloned().chain(["--json".to_string()]));
    let out = edgetune(&a);
    assert!(out.status.success(), "{what}: train failed: {}", text(&out.stderr));
    let steps: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("event"))
        .filter(|e| e["event"] == "step")
        .collect();
    let (loss, norm, lr) = (fx.f32("losses"), fx.f32("grad_norms"), fx.f32("learning_rates"));
    assert_eq!(steps.len(), loss.len(), "{what}: steps");
    for (i, s) in steps.iter().enumerate() {
        let got = |k: &str| s[k].as_f64().expect(k);
        eprintln!(
            "{what} step {}: loss {:.6} ({:.6}), grad norm {:.5} ({:.5}), lr {:.3e} ({:.3e})",
            i + 1,
            got("loss"),
            loss[i],
            got("grad_norm"),
            norm[i],
            got("lr"),
            lr[i]
        );
        // peft_parity's bound for a ten-step AdamW curve in f32: 1e-3 relative (the two sum in
        // other orders; observed differences are near 1e-6).
        let rel = |g: f64, w: f32| (g - f64::from(w)).abs() <= 1e-3 * f64::from(w).abs() + 1e-6;
        for (k, want) in [("loss", loss[i]), ("grad_norm", norm[i]), ("lr", lr[i])] {
            assert!(rel(got(k), want), "{what} step {}: {k} {} vs {want}", i + 1, got(k));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The adapter TRL wrote comes back: `edgetune import` reads what it holds, and edgetune's logits
/// with it are PEFT's.
#[test]
fn trls_adapter_comes_back_with_pefts_logits() {
    let ctx = Arc::new(GpuContext::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe in CI)"));
    for (name, model, _) in CASES {
        let fx = Fixture::open(&format!("export_trl_{name}_expected.safetensors"));
        let (model_path, dir) = (fixtures().join(model), fixtures().join(format!("export_trl_{name}_adapter")));
        let out = edgetune(&[
            "import".into(),
            "--model".into(),
            model_path.display().to_string(),
            "--adapter".into(),
            dir.display().to_string(),
        ]);
        assert!(out.status.success(), "{name}: import failed: {}", text(&out.stderr));
        let said = text(&out.stdout);
        let (r, rs) = if name == "qwen2" { (8, " (rsLoRA)") } else { (16, "") };
        assert!(said.contains(&format!("r: {r}, alpha: 32")) && said.contains(rs), "{name}: {said}");
        assert!(
            said.contains("modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj in 2 of 2"),
            "{said}"
        );

        assert!(!text(&out.stderr).contains("warning"), "{name}: {}", text(&out.stderr));
        // Against another base: a name that differs is a warning, shapes that differ an error
        // naming the tensor.
        let other = if name == "llama" { "tiny_qwen2_bpe.gguf" } else { "tiny_llama" };
        let (o, d) = (fixtures().join(other).display().to_string(), dir.display().to_string());
        let warned = edgetune(&["import", "--model", &o, "--adapter", &d].map(String::from));
        assert!(
            warned.status.success() && text(&warned.stderr).contains(&format!("not {other}")),
            "{}",
            text(&warned.stderr)
        );
        let q3 = fixtures().join("tiny_qwen3").display().to_string();
        let wrong = edgetune(&["import", "--model", &q3, "--adapter", &d].map(String::from));
        let said = text(&wrong.stderr);
        assert!(!wrong.status.success() && said.contains("has shape") && said.contains("expected"), "{said}");

        let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
        let m = Model::open(ctx.clone(), &model_path, &opts).expect("tiny model loads");
        let adapter = edgetune::lora::load(&dir, &m.config).expect("TRL's adapter loads");
        let ids: Vec<u32> = fx.i64("probe_ids").iter().map(|&i| i as u32).collect();
        let got = m.all_logits_with(&ids, Some(&GpuAdapter::upload(&m.ctx, &adapter))).expect("logits");
        // As peft_parity: the same f32 maths summed in other orders, ~1e-6 apart.
        assert_close(&format!("{name}: logits with TRL's adapter"), &got, &fx.f32("probe_logits"), 1e-4, 1e-4);
        let base = m.all_logits(&ids).expect("logits");
        let moved = got.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "{name}: TRL's ten steps barely moved the logits ({moved}): this would prove nothing");
    }
}

/// Bad requests are refused before anything is written, naming what is wrong.
#[test]
fn export_job_refuses_what_it_cannot_export() {
    let model = fixtures().join("tiny_llama").display().to_string();
    let data = persona().display().to_string();
    let dir = scratch("refused");
    let base = |extra: &[&str]| -> Output {
        let mut a: Vec<String> =
            ["export-job", "--model", &model, "--data", &data, "--to", "trl"].map(String::from).to_vec();
        a.extend(["--output".to_string(), dir.display().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        edgetune(&a)
    };
    let gpus = base(&["--gpus", "0"]);
    assert!(!gpus.status.success() && text(&gpus.stderr).contains("gpus"), "{}", text(&gpus.stderr));
    let dpo = base(&["--method", "dpo"]);
    assert!(!dpo.status.success() && text(&dpo.stderr).contains("DPO"), "{}", text(&dpo.stderr));
    let mm = fixtures().join("tiny_gemma3_mm").display().to_string();
    let mut a: Vec<String> = ["export-job", "--model", &mm, "--data", &data, "--to", "trl"].map(String::from).to_vec();
    a.extend(["--output".to_string(), dir.display().to_string()]);
    let multimodal = edgetune(&a);
    assert!(
        !multimodal.status.success() && text(&multimodal.stderr).contains("tiny_gemma3_mm is a multimodal model"),
        "{}",
        text(&multimodal.stderr)
    );
    assert!(!dir.exists(), "nothing written");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("mine.txt"), "keep me").expect("file");
    let full = base(&[]);
    assert!(!full.status.success() && text(&full.stderr).contains("not empty"), "{}", text(&full.stderr));
    assert_eq!(std::fs::read_to_string(dir.join("mine.txt")).expect("kept"), "keep me");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The LLaMA-Factory export (`tests/reference/export_llamafactory.py` ran it with LLaMA-Factory
/// 0.9.5): its parser read the job, its loader and collator gave each row's ids and labels with a
/// block-diagonal causal mask over the row's samples, and its ten steps are edgetune's.
#[test]
fn the_llamafactory_job_is_what_llamafactory_ran_and_trains_as_edgetune_does() {
    let fx = Fixture::open("export_llamafactory_llama_expected.safetensors");
    let all: Vec<String> = serde_json::from_str(&fx.metadata("args")).expect("args");
    let dir = scratch("lf").join("job");
    let model = fixtures().join("tiny_llama").display().to_string();
    let mut a: Vec<String> = vec!["export-job".into(), "--model".into(), model.clone()];
    a.extend(["--data".into(), persona().display().to_string(), "--output".into(), dir.display().to_string()]);
    a.extend(all.iter().cloned());
    let out = edgetune(&a);
    assert!(out.status.success(), "export-job failed: {}", text(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let yaml = read("job.yaml");
    let same = |t: &str| -> Vec<String> {
        t.lines().filter(|l| !l.starts_with("model_name_or_path:")).map(String::from).collect()
    };
    assert_eq!(same(&yaml), same(&fx.metadata("job_yaml")), "job.yaml differs from the one LLaMA-Factory ran");
    assert!(yaml.contains(&format!("model_name_or_path: {}", std::fs::canonicalize(&model).expect("path").display())));
    assert!(read("prepare_data.py") == fx.metadata("prepare_data_py"), "prepare_data.py changed: run the generator");
    let info: Value = serde_json::from_str(&read("dataset_info.json")).expect("dataset_info.json");
    assert!(info["edgetune_rows"]["file_name"] == "data/train.jsonl" && info["edgetune_validation"].is_object());
    for (i, row) in read_json_lines(&dir.join("data/train.jsonl")).iter().enumerate() {
        assert_eq!(ints(&row["input_ids"]), fx.i64(&format!("row{i}.input_ids")), "row {i}: ids");
        assert_eq!(ints(&row["labels"]), fx.i64(&format!("row{i}.labels")), "row {i}: labels");
        let samples: Vec<i64> =
            ints(&row["seq_lengths"]).iter().enumerate().flat_map(|(k, &n)| (0..n).map(move |_| k as i64)).collect();
        assert_eq!(samples, fx.i64(&format!("row{i}.sample_of_token")), "row {i}: samples");
    }
    // edgetune's steps with the same arguments.
    assert_eq!(all[..2], ["--to", "llamafactory"]);
    takes_the_steps_of("LLaMA-Factory llama", &fx, "tiny_llama", &all[2..]);
    let _ = std::fs::remove_dir_all(dir.parent().expect("scratch"));
}
