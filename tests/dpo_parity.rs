//! DPO parity with Hugging Face TRL's DPOTrainer (fixtures written by tests/reference/dpo.py):
//! on the tiny Llama with the committed PEFT adapter as the policy and the base (the adapter
//! disabled) as the reference, one step's loss, TRL's reward metrics and every LoRA gradient, for
//! the sigmoid, IPO and robust (label smoothing) losses, with the reference computed in the step
//! and given ahead.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures, gpu};
use edgetune::gpu::launch::{DPO_STATS, DpoLoss};
use edgetune::lora::{Adapter, GpuAdapter, Layout, peft};
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::model::training::{Batch, DpoPass, Reference, WorkspacePlan};
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

/// The kernel's form of TRL's loss `name` with `label_smoothing` e (see dpo.wgsl).
fn kernel_loss(name: &str, beta: f32, e: f32) -> DpoLoss {
    match name {
        "sigmoid" => DpoLoss { beta, a: 1.0, b: 0.0, ipo: false, length_normalized: false },
        "robust" => DpoLoss {
            beta,
            a: (1.0 - e) / (1.0 - 2.0 * e),
            b: -e / (1.0 - 2.0 * e),
            ipo: false,
            length_normalized: false,
        },
        "ipo" => DpoLoss { beta, a: 0.0, b: 0.0, ipo: true, length_normalized: true },
        other => panic!("no loss {other}"),
    }
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

#[test]
fn one_step_loss_rewards_and_gradients_match_trl() {
    let fx = Fixture::open("dpo_llama_expected.safetensors");
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(Arc::new(gpu()), &fixtures().join("tiny_llama"), &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join("peft_llama_adapter"), &model.config).expect("PEFT adapter loads");
    // The base: the adapter with B = 0 adds exact zeros.
    let off = Adapter { params: vec![0.0; adapter.layout.len], ..adapter.clone() };
    let reference = GpuAdapter::upload(&model.ctx, &off);
    let b = pairs(&fx);
    assert_eq!(b.pairs.len(), 3);
    for name in ["sigmoid", "ipo", "robust"] {
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
            "{name}: loss {got_loss} vs TRL {}, rewards {chosen} / {rejected} vs {} / {}, logps {logps:?}",
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
            assert!((got - want).abs() <= tol, "{name}: {what} {got} vs TRL {want} (tolerance {tol:e})");
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
                let key = Layout::peft_key(sl, is_b);
                let want = fx.f32(&format!("{name}.grad.{key}"));
                let got = &in_step.grads[off..off + len];
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&format!("{name} {key}"), got, &want, 2e-3, 1e-3 * scale);
            }
        }
    }
}
