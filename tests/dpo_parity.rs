//! DPO parity with Hugging Face TRL's DPOTrainer (fixtures written by tests/reference/dpo.py):
//! on the tiny Llama and Qwen2 with the committed PEFT adapters (plain LoRA and rsLoRA) as the
//! policy and the base (the adapter disabled) as the reference, one step's loss, TRL's reward
//! metrics and every LoRA gradient, for the sigmoid, IPO, robust (label smoothing) and
//! conservative (sigmoid with label smoothing, TRL's `aot` on one pair at a time) losses,
//! with the reference computed in the step and given ahead; and ten trainer steps against TRL's
//! curve, from the preference records through each model's chat template.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures, gpu};
use edgetune::data::{self, DataConfig};
use edgetune::gpu::launch::{DPO_STATS, DpoLoss};
use edgetune::lora::{Adapter, GpuAdapter, peft};
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::model::training::{Batch, DpoPass, Reference, WorkspacePlan};
use edgetune::tokenizer::Tokenizer;
use edgetune::train::optimizer::AdamwConfig;
use edgetune::train::schedule::ScheduleKind;
use edgetune::train::{DpoConfig, DpoLossKind, DpoReference, Event, Method, Rewards, TrainConfig, Trainer};
use serde_json::Value;

/// TRL's collated batch (rows 0..P the chosen sequences, P..2P the rejected ones, right-padded)
/// as packed pairs: each pair's tokens under the attention mask, the completion mask as targets.
fn pairs(fx: &Fixture) -> Batch {
    let shape = fx.shape("input_ids");
    let (ids, mask, completion) = (fx.i64("input_ids"), fx.i64("attention_mask"), fx.i64("completion_mask"));
    let row = |r: usize| -> (Vec<u32>, Vec<bool>) {
        let at = r * shape[1];
        let n = mask[at..at + shape[1]].iter().filter(|&&m| m == 1).count();
        (ids[at..at + n].iter().map(|&i| i as u32).collect(), completion[at..at + n].iter().map(|&m| m == 1).collect())
    };
    let p = shape[0] / 2;
    let units: Vec<(Vec<u32>, Vec<bool>, usize)> = (0..p)
        .map(|i| {
            let ((mut ids, mut train), (rids, rtrain)) = (row(i), row(p + i));
            let k = ids.len();
            ids.extend(rids);
            train.extend(rtrain);
            (ids, train, k)
        })
        .collect();
    Batch::pack_units(units.iter().map(|(i, t, k)| (&i[..], &t[..], Some(*k)))).expect("pack")
}

/// The kernel's form of TRL's loss `name` with `label_smoothing` e (see dpo.wgsl), written out
/// from TRL's formulas; the trainer's own mapping (`DpoConfig::kernel_loss`) must agree.
fn kernel_loss(name: &str, beta: f32, e: f32) -> DpoLoss {
    let loss = match name {
        "sigmoid" => DpoLoss { beta, a: 1.0, b: 0.0, ipo: false, length_normalized: false },
        // -(1-e) log sigmoid(z) - e log sigmoid(-z)
        "cdpo" => DpoLoss { beta, a: 1.0 - e, b: e, ipo: false, length_normalized: false },
        "robust" => DpoLoss {
            beta,
            a: (1.0 - e) / (1.0 - 2.0 * e),
            b: -e / (1.0 - 2.0 * e),
            ipo: false,
            length_normalized: false,
        },
        "ipo" => DpoLoss { beta, a: 0.0, b: 0.0, ipo: true, length_normalized: true },
        other => panic!("no loss {other}"),
    };
    let kind = match name {
        "sigmoid" | "cdpo" => DpoLossKind::Sigmoid,
        "robust" => DpoLossKind::Robust,
        _ => DpoLossKind::Ipo,
    };
    let trainer = DpoConfig { beta, loss: kind, label_smoothing: e, reference: None }.kernel_loss();
    assert_eq!(format!("{trainer:?}"), format!("{loss:?}"), "{name}: the trainer's loss");
    loss
}

struct Step {
    stats: Vec<f32>,
    grads: Vec<f32>,
}

fn step(model: &Model, adapter: &Adapter, reference: &GpuAdapter, b: &Batch, loss: DpoLoss, ahead: bool) -> Step {
    let ctx = &model.ctx;
    let gpu = GpuAdapter::upload(ctx, adapter);
    let ws = model.workspace(WorkspacePlan::new(b.len(), 4)).expect("workspace");
    let grads = ctx.storage_zeroed("grads", adapter.layout.len);
    let given;
    let r = if ahead {
        let mut enc = ctx.encoder();
        model.pair_logps(&mut enc, &ws, b, reference).expect("reference");
        ctx.submit([enc.finish()]);
        given = ctx.read_f32(&ws.dpo_reference, 2 * b.pairs.len()).expect("read");
        Reference::Given(&given)
    } else {
        Reference::Adapter(reference)
    };
    let mut enc = ctx.encoder();
    let scale = 1.0 / b.pairs.len() as f32;
    model.forward_backward_dpo(&mut enc, &ws, b, &gpu, &grads, DpoPass { loss, reference: r }, scale).expect("dpo");
    ctx.submit([enc.finish()]);
    Step {
        stats: ctx.read_f32(&ws.dpo_stats, DPO_STATS * b.pairs.len()).expect("stats"),
        grads: ctx.read_f32(&grads, adapter.layout.len).expect("grads"),
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// One step of each loss on `family`'s tiny model against TRL's.
fn one_step_matches_trl(family: &str) {
    let fx = Fixture::open(&format!("dpo_{family}_expected.safetensors"));
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model =
        Model::open(Arc::new(gpu()), &fixtures().join(format!("tiny_{family}")), &opts).expect("tiny model loads");
    let adapter =
        peft::load(&fixtures().join(format!("peft_{family}_adapter")), &model.config).expect("PEFT adapter loads");
    // The base: the adapter with B = 0 adds exact zeros.
    let off = Adapter { params: vec![0.0; adapter.layout.len], ..adapter.clone() };
    let reference = GpuAdapter::upload(&model.ctx, &off);
    let b = pairs(&fx);
    assert_eq!(b.pairs.len(), 3);
    for name in ["sigmoid", "ipo", "robust", "cdpo"] {
        let want: Value = serde_json::from_str(&fx.metadata(name)).expect("metadata");
        let w = |k: &str| want[k].as_f64().unwrap_or_else(|| panic!("{name}: {k}"));
        let loss = kernel_loss(name, w("beta") as f32, w("label_smoothing") as f32);
        let in_step = step(&model, &adapter, &reference, &b, loss, false);
        let ahead = step(&model, &adapter, &reference, &b, loss, true);
        // The same kernels on the same reference values: identical to the bit.
        assert_eq!(in_step.stats, ahead.stats, "{name}: reference in the step and ahead");
        assert_eq!(in_step.grads, ahead.grads, "{name}: gradients, reference in the step and ahead");
        let s: Vec<&[f32]> = in_step.stats.chunks(DPO_STATS).collect();
        let col = |j: usize| s.iter().map(move |p| f64::from(p[j]));
        let got_loss = mean(col(0));
        let (chosen, rejected) = (mean(col(1)), mean(col(2)));
        let margins = mean(s.iter().map(|p| f64::from(p[1] - p[2])));
        let accuracies = mean(s.iter().map(|p| f64::from(u8::from(p[1] > p[2]))));
        let logps = (mean(col(3)), mean(col(4)));
        eprintln!(
            "{family} {name}: loss {got_loss} vs TRL {}, rewards {chosen} / {rejected} vs {} / {}, logps {logps:?}",
            w("loss"),
            w("rewards/chosen"),
            w("rewards/rejected")
        );
        // Tolerances. The per-token cross-entropies agree with transformers' within 1e-4 of
        // their size (peft_parity's bound on the same model), so a completion's log-probability
        // (a sum of them) within 1e-4 of its magnitude |pi|, and a log-ratio within 1e-4 of
        // |pi| + |ref|; a reward is beta times one. Rewards here are small differences of
        // log-probabilities near -50 to -120, so this bound is what the data allow.
        let lp = logps.0.abs().max(logps.1.abs());
        let ratio_tol = 1e-4 * 2.0 * lp;
        let beta = w("beta");
        let close = |what: &str, got: f64, want: f64, tol: f64| {
            assert!((got - want).abs() <= tol, "{family} {name}: {what} {got} vs TRL {want} (tolerance {tol:e})");
        };
        close("logps/chosen", logps.0, w("logps/chosen"), 1e-4 * lp);
        close("logps/rejected", logps.1, w("logps/rejected"), 1e-4 * lp);
        close("rewards/chosen", chosen, w("rewards/chosen"), beta * ratio_tol);
        close("rewards/rejected", rejected, w("rewards/rejected"), beta * ratio_tol);
        close("rewards/margins", margins, w("rewards/margins"), 2.0 * beta * ratio_tol);
        // TRL takes the mean of the 0/1 accuracies in f32 (1/3 as 0.3333333432674408).
        close("rewards/accuracies", accuracies, w("rewards/accuracies"), 1e-7);
        // The loss moves with h = the difference of two log-ratios (each divided by the
        // completion's tokens for IPO, at least 4 here): |dL/dh| is at most beta for the
        // sigmoid family (times |a| + |b| for robust) and 2 |h - 1/(2 beta)| for IPO.
        let h_tol = 2.0 * ratio_tol / if name == "ipo" { 4.0 } else { 1.0 };
        let slope = match name {
            "ipo" => 2.0 * (2.0 * w("loss").sqrt() + h_tol),
            "robust" => beta * 1.5,
            _ => beta,
        };
        close("loss", got_loss, w("loss"), slope * h_tol + 1e-6);
        // Gradients: each is the supervised backward weighted by dL/dpi per completion; the
        // weights carry the loss's error above (relative to dL/dh, at most 1e-3 here), the
        // backward the 1e-4 of peft_parity. 2e-3 relative, with a floor of 1e-3 of the
        // tensor's largest gradient.
        for sl in &adapter.layout.slots {
            for (is_b, off, len) in [(false, sl.a, 4 * sl.n_in), (true, sl.b, sl.n_out * 4)] {
                let key = adapter.layout.peft_key(sl, is_b);
                let want = fx.f32(&format!("{name}.grad.{key}"));
                let got = &in_step.grads[off..off + len];
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&format!("{family} {name} {key}"), got, &want, 2e-3, 1e-3 * scale);
            }
        }
    }
}

#[test]
fn one_step_loss_rewards_and_gradients_match_trl_on_llama() {
    one_step_matches_trl("llama");
}

#[test]
fn one_step_loss_rewards_and_gradients_match_trl_on_qwen2_with_rslora() {
    one_step_matches_trl("qwen2");
}

/// The fixture's preference records (TRL's conversational format) as a JSONL file of this
/// call's own: the tests run in parallel threads, and one writing a shared file while another
/// read it gave the reader an empty file ("holds no records").
fn pair_records() -> std::path::PathBuf {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tokens: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("dpo_tokens_expected.json")).expect("token fixture"),
    )
    .expect("json");
    let lines: Vec<String> =
        tokens["conversational"]["records"].as_array().expect("records").iter().map(Value::to_string).collect();
    let dir = std::env::temp_dir().join(format!("edgetune-dpo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let p = dir.join(format!("pairs-{}.jsonl", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    std::fs::write(&p, lines.join("\n")).expect("write");
    p
}

/// Ten AdamW steps of the trainer on `family`'s tiny model, every pair in each step, from the
/// committed adapter.
fn trainer_curve(family: &str, reference: DpoReference) -> Vec<(f32, f32, Rewards)> {
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let dir = fixtures().join(format!("tiny_{family}"));
    let model = Arc::new(Model::open(Arc::new(gpu()), &dir, &opts).expect("tiny model"));
    let adapter =
        peft::load(&fixtures().join(format!("peft_{family}_adapter")), &model.config).expect("PEFT adapter loads");
    let data_cfg = DataConfig { val_fraction: Some(0.0), ..Default::default() };
    let tok = Tokenizer::open(&dir).expect("tokenizer");
    let dataset = data::load(&pair_records(), &tok, &data_cfg).expect("pairs load");
    let cfg = TrainConfig {
        method: Method::Dpo,
        dpo: DpoConfig { beta: 0.1, reference: Some(reference), ..Default::default() },
        data: data_cfg,
        learning_rate: Some(1e-2),
        lr_schedule: ScheduleKind::Constant,
        warmup_steps: Some(0),
        max_steps: Some(10),
        batch_tokens: Some(1024),
        optimizer: AdamwConfig { weight_decay: 0.0, max_grad_norm: 1.0, ..Default::default() },
        ..Default::default()
    };
    let mut trainer = Trainer::with_adapter(model, &dataset, cfg, adapter).expect("trainer");
    assert_eq!(trainer.steps_per_epoch(), 1, "the three pairs in one step");
    let mut steps = Vec::new();
    trainer
        .run(|e| {
            if let Event::Step { loss, grad_norm, rewards, .. } = e {
                steps.push((*loss, *grad_norm, rewards.expect("a DPO step reports rewards")));
            }
        })
        .expect("runs");
    steps
}

/// The trainer's ten steps on `family`, the reference both ways, against TRL's curve.
fn curve_matches_trl(family: &str) {
    let fx = Fixture::open(&format!("dpo_{family}_expected.safetensors"));
    let want: Value = serde_json::from_str(&fx.metadata("curve")).expect("curve");
    let ahead: Value = serde_json::from_str(&fx.metadata("curve_precomputed")).expect("curve");
    assert_eq!(want, ahead, "TRL: the same curve both ways");
    let series = |k: &str| -> Vec<f64> { want[k].as_array().expect(k).iter().map(|v| v.as_f64().expect(k)).collect() };
    let pre = trainer_curve(family, DpoReference::Precomputed);
    let in_step = trainer_curve(family, DpoReference::InStep);
    assert_eq!(pre, in_step, "the reference precomputed or in each step: the same kernels on the same values");
    let (loss, norm) = (series("loss"), series("grad_norm"));
    let (chosen, rejected, acc) = (series("rewards/chosen"), series("rewards/rejected"), series("rewards/accuracies"));
    for (i, (l, n, r)) in pre.iter().enumerate() {
        eprintln!(
            "{family} step {}: loss {l:.6} (TRL {:.6}), grad norm {n:.5} ({:.5}), rewards {:.4} / {:.4} ({:.4} / {:.4})",
            i + 1,
            loss[i],
            norm[i],
            r.chosen,
            r.rejected,
            chosen[i],
            rejected[i]
        );
        // peft_parity's bound for a 10-step AdamW curve, 1e-3 relative, for the loss and the
        // gradient norm; the rewards (beta times log-ratios of sums near -40 to -150, see the
        // one-step test) within beta * 2e-4 * 150.
        let rel = |got: f64, want: f64| (got - want).abs() <= 1e-3 * want.abs() + 1e-6;
        assert!(rel(f64::from(*l), loss[i]), "{family} step {}: loss {l} vs TRL {}", i + 1, loss[i]);
        assert!(rel(f64::from(*n), norm[i]), "{family} step {}: grad norm {n} vs TRL {}", i + 1, norm[i]);
        let tol = 0.1 * 2e-4 * 150.0;
        assert!((f64::from(r.chosen) - chosen[i]).abs() <= tol, "{family} step {}: rewards/chosen", i + 1);
        assert!((f64::from(r.rejected) - rejected[i]).abs() <= tol, "{family} step {}: rewards/rejected", i + 1);
        assert_eq!(f64::from(r.accuracies), acc[i], "{family} step {}: rewards/accuracies", i + 1);
    }
}

#[test]
fn ten_trainer_steps_match_trls_curve_with_the_reference_precomputed_or_in_each_step_on_llama() {
    curve_matches_trl("llama");
}

#[test]
fn ten_trainer_steps_match_trls_curve_with_the_reference_precomputed_or_in_each_step_on_qwen2() {
    curve_matches_trl("qwen2");
}
