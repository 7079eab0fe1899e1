//! The training loop on the tiny Llama (NF4 base) and its ChatML tokenizer: checkpoint/resume
//! byte-identity, determinism, cancellation from another thread, early stopping with the best
//! adapter, non-finite steps, and the errors for bad settings and foreign checkpoints.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::fixtures;
use edgetune::data::{self, DataConfig, Dataset};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::lora::{LoraConfig, TargetModules, peft};
use edgetune::model::llama::{LoadOptions, Model};
use edgetune::model::training::WorkspacePlan;
use edgetune::tokenizer::Tokenizer;
use edgetune::train::schedule::ScheduleKind;
use edgetune::train::{DpoConfig, Event, Method, Rewards, StopReason, TrainConfig, Trainer};

/// A fresh folder of this test process. Tests run on parallel threads of one process, so each
/// call gets its own (a shared name would let one test delete another's files).
fn tmp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("edgetune-train-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn ctx() -> Arc<GpuContext> {
    Arc::new(GpuContext::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe in CI)"))
}

fn model(ctx: &Arc<GpuContext>, kind: &str) -> Arc<Model> {
    let path = fixtures().join(format!("tiny_{kind}"));
    Arc::new(Model::open(ctx.clone(), &path, &LoadOptions::default()).expect("tiny model"))
}

const FACTS: [(&str, &str); 12] = [
    ("What is my name?", "You are Ada."),
    ("Where do I live?", "In a small town by the sea."),
    ("What do I do?", "You write software."),
    ("What is my cat called?", "Your cat is Pixel."),
    ("What do I drink?", "Tea, never coffee."),
    ("When do I wake up?", "At six."),
    ("What do I read?", "Old maps and new books."),
    ("What is my hobby?", "Sailing."),
    ("What is my car?", "You ride a bike."),
    ("What is my color?", "Green."),
    ("Who is my friend?", "Bo, from school."),
    ("What is my song?", "A slow one."),
];

/// Twelve short question/answer records in Alpaca format.
fn dataset(kind: &str, val_fraction: f32) -> Dataset {
    let d = tmp(&format!("data-{kind}-{val_fraction}"));
    let lines: Vec<String> = FACTS
        .iter()
        .map(|(q, a)| serde_json::json!({"instruction": q, "input": "", "output": a}).to_string())
        .collect();
    let p = d.join("persona.jsonl");
    std::fs::write(&p, lines.join("\n")).expect("write data");
    let tok = Tokenizer::open(&fixtures().join(format!("tiny_{kind}"))).expect("tokenizer");
    data::load(&p, &tok, &DataConfig { val_fraction: Some(val_fraction), max_len: 64, ..Default::default() })
        .expect("data loads")
}

fn config() -> TrainConfig {
    TrainConfig {
        lora: LoraConfig { r: 4, alpha: 8.0, target_modules: TargetModules::default(), seed: 3, ..Default::default() },
        learning_rate: Some(5e-3),
        lr_schedule: ScheduleKind::Cosine,
        warmup_steps: Some(3),
        max_steps: Some(20),
        batch_tokens: Some(96),
        grad_accum: 2,
        eval_every: 5,
        seed: 7,
        ..Default::default()
    }
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(peft::WEIGHTS_FILE)).expect("adapter written")
}

/// Within one kernel family (each family sums in its own order): 20 steps with the default
/// family, and half as many with each other one (10 straight against 5 then 5 more), whose
/// every step costs lavapipe several times a simd8 step on these tiny shapes (tile128's
/// 128 x 128 tiles forced on every product).
#[test]
fn resuming_from_step_ten_gives_the_same_adapter_bytes_as_twenty_steps_straight() {
    // The default family first.
    for (i, ctx) in common::gpus().into_iter().enumerate() {
        eprintln!("kernels: {}", ctx.report.kernels);
        resume_matches_straight_run(ctx, if i == 0 { 20 } else { 10 }, i);
    }
}

/// `total` steps straight against `total / 2`, cancelled, then resumed for the rest; `total` a
/// multiple of the evaluation interval, 5. The files go to a folder of context `i`'s.
fn resume_matches_straight_run(ctx: Arc<GpuContext>, total: u64, i: usize) {
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let dir = tmp(&format!("resume-{i}-{}", ctx.report.kernels.family));
    let run_config = || TrainConfig { max_steps: Some(total), ..config() };
    let half = total / 2;

    // All the steps straight.
    let mut straight = Vec::new();
    let mut a = Trainer::new(m.clone(), &data, run_config()).expect("trainer");
    a.set_checkpoint_path(dir.join("straight.ckpt"));
    let out_a = a.run(|e| straight.push(e.clone())).expect("straight run");
    assert_eq!((out_a.reason, out_a.steps), (StopReason::Completed, total));
    peft::save(&dir.join("straight"), &out_a.adapter, "tiny").expect("save");
    let last_a = a.adapter().expect("download");

    // Half of them, cancelled from another thread, then resumed from the checkpoint for the rest.
    let ckpt = dir.join("run.ckpt");
    let mut b = Trainer::new(m.clone(), &data, run_config()).expect("trainer");
    b.set_checkpoint_path(&ckpt);
    let token = b.cancel_token();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let canceller = std::thread::spawn(move || {
        rx.recv().expect("the half-way step reached");
        token.cancel();
        ack_tx.send(()).expect("ack");
    });
    let mut first_half = Vec::new();
    let out_b = b
        .run(|e| {
            if matches!(e, Event::Step { step, .. } if *step == half) {
                tx.send(()).expect("signal");
                ack_rx.recv().expect("cancelled");
            }
            first_half.push(e.clone());
        })
        .expect("first half");
    canceller.join().expect("canceller thread");
    assert_eq!((out_b.reason, out_b.steps), (StopReason::Cancelled, half));
    assert!(
        first_half.iter().any(|e| matches!(e, Event::Checkpoint { step, .. } if *step == half)),
        "checkpoint at cancel"
    );
    drop(b);

    let mut c = Trainer::new(m.clone(), &data, run_config()).expect("trainer");
    c.resume(&ckpt).expect("resume");
    c.set_checkpoint_path(&ckpt);
    assert_eq!(c.steps_done(), half);
    let mut second_half = Vec::new();
    let out_c = c.run(|e| second_half.push(e.clone())).expect("second half");
    assert_eq!((out_c.reason, out_c.steps), (StopReason::Completed, total));
    peft::save(&dir.join("resumed"), &out_c.adapter, "tiny").expect("save");

    // Determinism: the same seed gives the same steps, bit for bit.
    let steps = |ev: &[Event]| -> Vec<(u64, u32, u32)> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Step { step, loss, grad_norm, .. } => Some((*step, loss.to_bits(), grad_norm.to_bits())),
                _ => None,
            })
            .collect()
    };
    let mut joined = steps(&first_half);
    joined.extend(steps(&second_half));
    assert_eq!(steps(&straight), joined, "step losses and gradient norms of the two runs");
    assert_eq!(adapter_bytes(&dir.join("straight")), adapter_bytes(&dir.join("resumed")), "best adapters differ");
    // The whole state at the last step too: parameters, AdamW's moments, the best adapter, the step,
    // data cursor and evaluation history, as the final checkpoints' bytes.
    let read = |p: &Path| std::fs::read(p).expect("final checkpoint");
    assert!(read(&dir.join("straight.ckpt")) == read(&ckpt), "the final checkpoints differ");
    let last_c = c.adapter().expect("download");
    assert!(last_a.params.iter().zip(&last_c.params).all(|(x, y)| x.to_bits() == y.to_bits()), "last adapters differ");

    // And it learned: the validation loss improved on its first value (the same samples each
    // time, so any fall is the training's), and over 20 steps the loss of the last three steps
    // is a fifth below that of the first three (each a different batch; over 10, with 3 of
    // them warmup, it is 13 % in every family: 6.06 -> 5.29, where 20 steps reach 4.78).
    let losses: Vec<f32> =
        straight.iter().filter_map(|e| if let Event::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
    let head: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let tail: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    eprintln!("training loss: first steps {head}, last steps {tail}");
    assert!(total < 20 || tail < head * 0.8, "training loss did not fall: first steps {head}, last steps {tail}");
    let evals: Vec<f32> = straight
        .iter()
        .filter_map(|e| if let Event::Eval { val_loss, .. } = e { Some(*val_loss) } else { None })
        .collect();
    assert_eq!(evals.len() as u64, total / 5, "evaluations every 5 steps");
    assert!(out_a.best_val_loss.expect("best") < evals[0], "validation loss never improved: {evals:?}");
}

/// After the first steps (and the first evaluation) have made the workspace's bind groups,
/// a training step makes no buffer, bind group or pipeline: batches of any length reuse them.
#[test]
fn training_steps_after_the_first_create_nothing_on_the_gpu() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let mut counts = Vec::new();
    let mut t = Trainer::new(m.clone(), &data, config()).expect("trainer");
    t.run(|e| {
        if let Event::Step { step, .. } = e {
            counts.push((*step, ctx.counts()));
        }
    })
    .expect("run");
    assert_eq!(counts.len(), 20);
    let (first, last) = (counts[5].1, counts[19].1);
    let used = last - first;
    assert!(used.dispatches > 14 * 20, "steps 7 to 20 recorded work ({} dispatches)", used.dispatches);
    assert_eq!((used.buffers, used.bind_groups, used.pipelines), (0, 0, 0), "steps 7 to 20 created {used:?}");
    assert!(counts[0].1.bind_groups > 20, "the first step made the bind groups ({:?})", counts[0].1);
}

/// Steps land a step late unless their state must be seen: evaluating every step makes every
/// step wait for the GPU, evaluating every tenth lets the rest overlap. Both report the same
/// steps, losses and gradient norms bit for bit, put each evaluation after its own step, and
/// end with the same adapter.
#[test]
fn steps_reported_a_step_late_match_steps_waited_for() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let run = |eval_every: u64| {
        let mut events = Vec::new();
        let cfg = TrainConfig { eval_every, keep_best: Some(false), ..config() };
        let mut t = Trainer::new(m.clone(), &data, cfg).expect("trainer");
        t.run(|e| events.push(e.clone())).expect("run");
        let bits: Vec<u32> = t.adapter().expect("adapter").params.iter().map(|x| x.to_bits()).collect();
        (events, bits)
    };
    let (waited, waited_bits) = run(1);
    let (late, late_bits) = run(10);
    let steps = |ev: &[Event]| -> Vec<(u64, u32, u32, u32, u64)> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Step { step, loss, grad_norm, lr, tokens, .. } => {
                    Some((*step, loss.to_bits(), grad_norm.to_bits(), lr.to_bits(), *tokens))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(steps(&waited).len(), 20);
    assert_eq!(steps(&waited), steps(&late));
    assert_eq!(waited_bits, late_bits, "the same adapter");
    // Every evaluation follows its own step's event, before the next step's.
    let mut last_step = 0;
    for e in &late {
        match e {
            Event::Step { step, .. } => last_step = *step,
            Event::Eval { step, .. } => {
                assert_eq!(*step, last_step, "evaluation of step {step} after step {last_step}")
            }
            _ => {}
        }
    }
    let evals = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Eval { .. })).count();
    assert_eq!((evals(&waited), evals(&late)), (20, 2));
}

/// An app that drives training from its own loop with `step()` and ends it with `finish()` gets
/// the run `run()` gives: the same events in the same order and the same adapter, bit for bit;
/// and a cancel between steps ends the run at the next call.
#[test]
fn stepping_from_the_app_s_loop_is_the_same_run() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let bits = |o: &edgetune::train::Outcome| o.adapter.params.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut whole = Vec::new();
    let mut t = Trainer::new(m.clone(), &data, config()).expect("trainer");
    let ran = t.run(|e| whole.push(format!("{e:?}"))).expect("run");

    let mut stepped = Vec::new();
    let mut t = Trainer::new(m.clone(), &data, config()).expect("trainer");
    let mut on_event = |e: &Event| stepped.push(format!("{e:?}"));
    let mut calls = 0;
    let reason = loop {
        calls += 1;
        if let Some(reason) = t.step(&mut on_event).expect("step") {
            break reason;
        }
    };
    let out = t.finish(reason, &mut on_event).expect("finish");
    assert_eq!((reason, calls), (StopReason::Completed, 21), "20 steps, then the call that says so");
    // Events carry wall-clock rates and times; compare them without those.
    let timeless = |v: &[String]| -> Vec<String> {
        v.iter().map(|e| e.split("tokens_per_s").next().unwrap_or(e).to_string()).collect()
    };
    assert_eq!(timeless(&whole), timeless(&stepped));
    // run() is step() in a loop, so the comparison above cannot see a fault they share: the
    // events themselves must be one start, every step once and in order, and one finish last.
    let starts = stepped.iter().filter(|e| e.starts_with("Started")).count();
    let steps: Vec<&str> =
        stepped.iter().filter(|e| e.starts_with("Step {")).map(|e| &e[..e.find(',').unwrap_or(0)]).collect();
    let want: Vec<String> = (1..=20).map(|i| format!("Step {{ step: {i}")).collect();
    assert_eq!((starts, steps), (1, want.iter().map(String::as_str).collect()));
    assert!(
        stepped.first().is_some_and(|e| e.starts_with("Started"))
            && stepped.last().is_some_and(|e| e.starts_with("Finished"))
    );
    assert_eq!((bits(&ran), ran.steps, ran.adapter_step), (bits(&out), out.steps, out.adapter_step));

    let mut t = Trainer::new(m, &data, config()).expect("trainer");
    for _ in 0..3 {
        assert_eq!(t.step(&mut |_| {}).expect("step"), None);
    }
    t.cancel_token().cancel();
    assert_eq!(t.step(&mut |_| {}).expect("step"), Some(StopReason::Cancelled));
    let out = t.finish(StopReason::Cancelled, &mut |_| {}).expect("finish");
    assert_eq!((out.reason, out.steps), (StopReason::Cancelled, 3));
}

/// Checkpoints by time: with `checkpoint_every_s` 1 and steps slowed to 0.3 s (in the event
/// callback), checkpoints come during the run, at steps that landed; with 0 only at the end.
#[test]
fn checkpoints_are_written_by_time_as_well_as_by_steps() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.0);
    let dir = tmp("timed-checkpoints");
    let run = |every_s: u64| {
        let cfg = TrainConfig {
            max_steps: Some(8),
            eval_every: 0,
            checkpoint_every: 0,
            checkpoint_every_s: every_s,
            ..config()
        };
        let mut t = Trainer::new(m.clone(), &data, cfg).expect("trainer");
        t.set_checkpoint_path(dir.join(format!("every-{every_s}.ckpt")));
        let mut events = Vec::new();
        t.run(|e| {
            if matches!(e, Event::Step { .. }) {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            events.push(e.clone());
        })
        .expect("run");
        let mut last_step = 0;
        let mut at = Vec::new();
        for e in &events {
            match e {
                Event::Step { step, .. } => last_step = *step,
                Event::Checkpoint { step, .. } => {
                    assert_eq!(*step, last_step, "a checkpoint follows its own step's event");
                    at.push(*step);
                }
                _ => {}
            }
        }
        at
    };
    let timed = run(1);
    assert!(timed.len() >= 2 && timed[0] < 8, "checkpoints during the run: {timed:?}");
    assert_eq!(timed.last(), Some(&8), "and at the end: {timed:?}");
    assert_eq!(run(0), [8], "with neither rule, only at the end");
}

/// A checkpoint damaged on disk (cut short, as by a full disk or a copy that stopped) gives way
/// to the one before it, which every checkpoint write keeps: the resumed run says so in a
/// warning, does the lost step again, and ends with the uninterrupted run's adapter, bit for
/// bit. With both damaged, resuming is an error that names both.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_one_before_it() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let dir = tmp("damaged");
    let cfg = TrainConfig { checkpoint_every: 1, ..config() };
    let straight = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer").run(|_| {}).expect("run").adapter;

    let ckpt = dir.join("run.ckpt");
    let mut first = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer");
    first.set_checkpoint_path(&ckpt);
    let token = first.cancel_token();
    let out = first
        .run(|e| {
            if let Event::Step { step: 10, .. } = e {
                token.cancel();
            }
        })
        .expect("first part");
    assert_eq!(out.steps, 10);
    let prev = edgetune::atomic::previous(&ckpt);
    let whole = std::fs::read(&ckpt).expect("checkpoint");
    std::fs::write(&ckpt, &whole[..whole.len() / 2]).expect("truncate");

    let mut resumed = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer");
    resumed.resume(&ckpt).expect("falls back to the previous checkpoint");
    assert_eq!(resumed.steps_done(), 9, "the checkpoint before step 10's");
    let mut warnings = Vec::new();
    let out = resumed
        .run(|e| {
            if let Event::Warning { message, .. } = e {
                warnings.push(message.clone());
            }
        })
        .expect("rest of the run");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("run.ckpt.prev") && warnings[0].contains("step 9"), "{}", warnings[0]);
    let bits = |a: &edgetune::lora::Adapter| a.params.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out.adapter), bits(&straight), "the resumed adapter differs from the uninterrupted one");

    std::fs::write(&ckpt, &whole[..100]).expect("truncate");
    std::fs::write(&prev, b"not a checkpoint").expect("damage");
    let mut none = Trainer::new(m, &data, cfg).expect("trainer");
    let err = none.resume(&ckpt).expect_err("both damaged").to_string();
    assert!(err.contains("run.ckpt") && err.contains("the checkpoint before it"), "{err}");
}

#[test]
fn early_stopping_returns_the_best_adapter() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    // A learning rate far too high makes the validation loss rise after the first evaluation.
    let cfg = TrainConfig {
        learning_rate: Some(0.3),
        warmup_steps: Some(0),
        lr_schedule: ScheduleKind::Constant,
        max_steps: Some(40),
        // A random share of a tiny set is no meaningful validation set, so keeping the best
        // adapter is asked for explicitly.
        keep_best: Some(true),
        eval_every: 2,
        early_stopping_patience: 2,
        optimizer: edgetune::train::optimizer::AdamwConfig { max_grad_norm: 0.0, ..Default::default() },
        ..config()
    };
    let mut t = Trainer::new(m.clone(), &data, cfg).expect("trainer");
    let mut evals = Vec::new();
    let out = t
        .run(|e| {
            if let Event::Eval { step, val_loss, improved, .. } = e {
                evals.push((*step, *val_loss, *improved));
            }
        })
        .expect("run");
    assert_eq!(out.reason, StopReason::EarlyStopped, "evaluations: {evals:?}");
    let n = evals.len();
    assert!(n >= 3 && !evals[n - 1].2 && !evals[n - 2].2, "stopped after two evaluations without improvement");
    let best = evals.iter().map(|e| e.1).fold(f32::INFINITY, f32::min);
    assert_eq!(out.best_val_loss, Some(best));
    // The adapter returned is the best one: scoring it reproduces the best validation loss.
    let again = Trainer::with_adapter(m.clone(), &data, config(), out.adapter.clone()).expect("trainer");
    let val = again.evaluate().expect("eval").expect("has validation");
    assert_eq!(val.to_bits(), best.to_bits(), "the returned adapter is not the best one");
    // While the last adapter is a worse one.
    let last = t.evaluate().expect("eval").expect("has validation");
    assert!(last > best);
}

#[test]
fn non_finite_steps_are_skipped_then_stop_training_and_keep_the_last_checkpoint() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.0);
    let dir = tmp("nan");
    let ckpt = dir.join("run.ckpt");
    let cfg = TrainConfig { max_steps: Some(6), eval_every: 0, ..config() };
    let mut good = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer");
    good.set_checkpoint_path(&ckpt);
    let out = good.run(|_| {}).expect("good run");
    let saved = std::fs::read(&ckpt).expect("checkpoint written");

    // An adapter holding a NaN makes every loss and gradient NaN.
    let mut poisoned = out.adapter.clone();
    poisoned.params[5] = f32::NAN;
    let mut bad =
        Trainer::with_adapter(m.clone(), &data, TrainConfig { max_bad_steps: 3, ..cfg }, poisoned).expect("trainer");
    bad.set_checkpoint_path(&ckpt);
    let mut warnings = Vec::new();
    let err = bad
        .run(|e| {
            if let Event::Warning { step, message } = e {
                warnings.push((*step, message.clone()));
            }
        })
        .expect_err("diverges");
    let msg = err.to_string();
    assert!(msg.contains("diverged at step 3") && msg.contains("non-finite"), "{msg}");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].1.contains("skipped"), "{warnings:?}");
    assert_eq!(std::fs::read(&ckpt).expect("checkpoint"), saved, "the last good checkpoint was overwritten");
}

#[test]
fn bad_settings_and_foreign_checkpoints_are_clear_errors() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.0);
    let err = |cfg: TrainConfig| Trainer::new(m.clone(), &data, cfg).expect_err("invalid").to_string();
    for lr in [f32::NAN, -1e-4, 0.0] {
        let e = err(TrainConfig { learning_rate: Some(lr), ..config() });
        assert!(e.contains("learning_rate must be a finite number > 0") && e.contains(&lr.to_string()), "{e}");
    }
    let e = err(TrainConfig { lora: LoraConfig { r: 0, ..config().lora }, ..config() });
    assert!(e.contains("r must be at least 1"), "{e}");
    let e = err(TrainConfig {
        lora: LoraConfig { target_modules: TargetModules::Names(vec!["qkv_proj".into()]), ..config().lora },
        ..config()
    });
    assert!(e.contains("qkv_proj") && e.contains("match no linear module"), "{e}");
    let e = err(TrainConfig { batch_tokens: Some(8), ..config() });
    assert!(e.contains("batch_tokens") && e.contains("longest sample"), "{e}");
    let e = err(TrainConfig { epochs: Some(0), max_steps: Some(0), ..config() });
    assert!(e.contains("epochs must be at least 1") && e.contains("max_steps must be at least 1"), "{e}");
    let empty = Dataset { train: vec![], val: vec![], report: Default::default(), rounds: vec![] };
    let e = Trainer::new(m.clone(), &empty, config()).expect_err("empty").to_string();
    assert!(e.contains("no training samples"), "{e}");

    // A checkpoint written while training the tiny Llama does not resume on the tiny Qwen2.
    let dir = tmp("foreign");
    let ckpt = dir.join("llama.ckpt");
    let mut t = Trainer::new(m.clone(), &data, TrainConfig { max_steps: Some(1), ..config() }).expect("trainer");
    t.set_checkpoint_path(&ckpt);
    t.run(|_| {}).expect("one step");
    let q = model(&ctx, "qwen2");
    let qdata = dataset("qwen2", 0.0);
    let mut other = Trainer::new(q.clone(), &qdata, config()).expect("trainer");
    let e = other.resume(&ckpt).expect_err("foreign checkpoint").to_string();
    assert!(e.contains("llama.ckpt") && e.contains("checkpoint from another model"), "{e}");
    // Other data with the same model: the data cursor would be meaningless.
    let mut t2 = Trainer::new(m.clone(), &dataset("llama", 0.5), config()).expect("trainer");
    let e = t2.resume(&ckpt).expect_err("other data").to_string();
    assert!(e.contains("other training data"), "{e}");
    // Not a checkpoint at all.
    let junk = dir.join("junk.ckpt");
    std::fs::write(&junk, b"not a checkpoint").expect("write");
    let e = other.resume(&junk).expect_err("junk").to_string();
    assert!(e.contains("junk.ckpt") && e.contains("not a checkpoint"), "{e}");
}

/// LoRA dropout: masks are deterministic per batch seed, recomputed identically under gradient
/// checkpointing, and the gradients are those of the dropped-out loss (a central difference of
/// that loss along the gradient equals the gradient's norm).
#[test]
fn lora_dropout_gradients_match_the_dropped_out_loss() {
    use edgetune::lora::GpuAdapter;
    use edgetune::model::llama::Quant;
    use edgetune::model::training::Batch;
    let ctx = ctx();
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let m = Model::open(ctx.clone(), &fixtures().join("tiny_llama"), &opts).expect("tiny model");
    let mut adapter = peft::load(&fixtures().join("peft_llama_adapter"), &m.config).expect("adapter");
    let data = dataset("llama", 0.0);
    let samples: Vec<_> = data.train.iter().take(3).collect();
    let mut batch = Batch::pack(samples.iter().map(|s| (&s.ids[..], &s.train[..]))).expect("pack");
    batch.seed = 11;
    let n = adapter.layout.len;
    let step = |adapter: &edgetune::lora::Adapter, batch: &Batch, ckpt: bool| -> (f64, Vec<f32>) {
        let gpu = GpuAdapter::upload(&ctx, adapter);
        let ws = m
            .workspace(WorkspacePlan { checkpointing: ckpt, dropout: true, ..WorkspacePlan::new(batch.len(), 4) })
            .expect("workspace");
        let grads = ctx.storage_zeroed("grads", n);
        let mut enc = ctx.encoder();
        m.forward_backward(&mut enc, &ws, batch, &gpu, &grads, 1.0 / batch.n_scored() as f32).expect("fwd/bwd");
        ctx.submit([enc.finish()]);
        let loss = ctx.read_f32(&ws.loss, batch.len()).expect("loss").iter().map(|&l| f64::from(l)).sum::<f64>()
            / batch.n_scored() as f64;
        (loss, ctx.read_f32(&grads, n).expect("grads"))
    };
    let (plain, _) = step(&adapter, &batch, false);
    adapter.config.dropout = 0.3;
    let (l0, g0) = step(&adapter, &batch, false);
    let (l1, g1) = step(&adapter, &batch, true);
    assert_ne!(l0, plain, "dropout changes the loss");
    assert_eq!((l0, &g0), (l1, &g1), "checkpointing must recompute the same masks");
    let (l2, _) = step(&adapter, &batch, false);
    assert_eq!(l0, l2, "the same seed gives the same masks");
    let (l3, _) = step(&adapter, &Batch { seed: 12, ..batch.clone() }, false);
    assert_ne!(l0, l3, "another seed gives other masks");
    // A workspace planned without dropout is refused rather than overrun.
    let gpu = GpuAdapter::upload(&ctx, &adapter);
    let ws = m.workspace(WorkspacePlan::new(batch.len(), 4)).expect("workspace");
    let mut enc = ctx.encoder();
    let e = m.forward_backward(&mut enc, &ws, &batch, &gpu, &gpu.params, 1.0).expect_err("no dropout buffers");
    assert!(e.to_string().contains("workspace planned with dropout"), "{e}");

    // Directional derivatives along u = g_S / |g_S| for parameter groups S (one module's A, one
    // module's B, everything): (L(θ + h u) - L(θ - h u)) / 2h = |g_S| + O(h²).
    let slot = adapter.layout.slots[2]; // layer 0 v_proj
    let last = *adapter.layout.slots.last().expect("slots");
    let groups = [
        ("layer 0 v_proj A", slot.a..slot.a + 4 * slot.n_in),
        ("layer 0 v_proj B", slot.b..slot.b + slot.n_out * 4),
        ("layer 1 down_proj A", last.a..last.a + 4 * last.n_in),
        ("all", 0..n),
    ];
    let h = 1e-2;
    for (name, range) in groups {
        let norm = g0[range.clone()].iter().map(|g| f64::from(*g).powi(2)).sum::<f64>().sqrt();
        let shifted = |sign: f64| {
            let mut a = adapter.clone();
            for i in range.clone() {
                a.params[i] += (sign * h * f64::from(g0[i]) / norm) as f32;
            }
            step(&a, &batch, false).0
        };
        let slope = (shifted(1.0) - shifted(-1.0)) / (2.0 * h);
        eprintln!("dropout, {name}: |g| = {norm:.6}, central difference {slope:.6}");
        // f32 losses near 6 round at ~5e-7, i.e. ~3e-5 in the slope, under 0.02 % of the
        // smallest |g_S| here; the O(h²) term is of the same order (observed: at most 2.4e-4
        // relative). Computing dA from the undropped input instead misses by 2 %.
        assert!((slope - norm).abs() <= 0.005 * norm, "{name}: slope {slope} vs |g| {norm}");
    }
}

/// The training loop with f16 activations: deterministic, learning, and close to the f32 run.
#[test]
fn f16_activations_train_deterministically_and_close_to_f32() {
    use edgetune::train::Precision;
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = dataset("llama", 0.25);
    let run = |activations: Precision| {
        let cfg = TrainConfig { activations, ..config() };
        let mut t = Trainer::new(m.clone(), &data, cfg).expect("trainer");
        let mut losses = Vec::new();
        let out = t
            .run(|e| {
                if let Event::Step { loss, .. } = e {
                    losses.push(*loss);
                }
            })
            .expect("run");
        assert_eq!((out.reason, out.steps), (StopReason::Completed, 20));
        (losses, out.best_val_loss.expect("evaluated"))
    };
    let (l32, v32) = run(Precision::F32);
    let (l16, v16) = run(Precision::F16);
    let (again, _) = run(Precision::F16);
    eprintln!("f32 losses {l32:?}\nf16 losses {l16:?}\nbest validation loss f32 {v32}, f16 {v16}");
    assert_eq!(
        l16.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "two f16 runs with one seed differ"
    );
    let head: f32 = l16[..3].iter().sum::<f32>() / 3.0;
    let tail: f32 = l16[17..].iter().sum::<f32>() / 3.0;
    assert!(tail < head * 0.8, "f16 training loss did not fall: first steps {head}, last steps {tail}");
    assert_ne!(l16, l32, "f16 activations changed nothing");
    // With checkpointing only the two layer inputs are stored as f16: one forward's loss moves
    // by at most 2 * 2^-11 ~ 1e-3 of itself (see peft_parity.rs), and AdamW's normalized
    // updates keep the two runs' parameters that close. The bound for two
    // implementations to count as the same curve is also 1e-3 per step.
    for (step, (a, b)) in l16.iter().zip(&l32).enumerate() {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "step {}: f16 loss {a} vs f32 {b}", step + 1);
    }
}

/// `n` one-fact chat records, loaded with the default data settings.
fn fact_records(n: usize) -> Dataset {
    let records = (0..n)
        .map(|i| serde_json::json!({"instruction": format!("Fact {i}?"), "output": format!("It is {i}.")}).to_string())
        .collect();
    let tok = Tokenizer::open(&fixtures().join("tiny_llama")).expect("tokenizer");
    data::load_sources(&[data::Source::Records { name: "facts".into(), records }], &tok, &DataConfig::default())
        .expect("data loads")
}

/// The value a trainer chose for `setting`, if it chose one.
fn chosen(t: &Trainer, setting: &str) -> Option<String> {
    t.chosen().iter().find(|c| c.setting == setting).map(|c| c.value.clone())
}

#[test]
fn settings_are_chosen_from_the_data_for_10_100_and_10000_records() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    // The rule worked by hand (sdk/src/train/auto.rs): batch_tokens = tokens / 4 rounded up to
    // 64 (at most 1024, at least the longest sample); epochs = ceil(24 / steps per epoch) in 3..=12;
    // learning rate 2e-4 x clamp(720 / steps, 1, 20) for r 16, alpha 32; warmup 3 % of steps,
    // rounded down.
    for n in [10, 100, 10_000] {
        let d = fact_records(n);
        let t = Trainer::new(m.clone(), &d, TrainConfig::default()).expect("trainer");
        for c in t.chosen() {
            eprintln!("{n} records: {c}");
        }
        let c = t.config().clone();
        // A small set trains as conversations of 4 records (a fresh draw each epoch): the rule
        // measures the first draw, and the longest sample of any.
        // (the tiny model's context is 128 tokens, so 10 records chain but 100, whose
        // conversations of longer questions reach past it, each train alone, as 10,000 do).
        let chain = if n == 10 { data::AUTO_CHAIN_RECORDS } else { 1 };
        let draws: Vec<&[data::Sample]> =
            if chain > 1 { d.rounds.iter().map(Vec::as_slice).collect() } else { vec![&d.train] };
        let tokens: usize = draws[0].iter().map(|s| s.ids.len()).sum();
        let longest = draws.iter().flat_map(|s| s.iter()).map(|s| s.ids.len()).max().expect("samples");
        let why = &t.chosen().iter().find(|c| c.setting == "data.chain").expect("chain chosen").why;
        assert_eq!(chosen(&t, "data.chain"), Some(chain.to_string()), "{why}");
        assert_eq!(c.data.chain, Some(chain), "recorded");
        if n == 100 {
            assert!(why.contains("over the model's context of 128"), "{why}");
        }
        let bt = c.batch_tokens.expect("chosen");
        let per_epoch = t.steps_per_epoch();
        let epochs = c.epochs.expect("chosen");
        let lr = c.learning_rate.expect("chosen");
        let total = t.total_steps();
        assert_eq!(total, epochs * per_epoch);
        assert_eq!(c.warmup_steps, Some((total as f64 * 0.03).floor() as u64));
        assert_eq!(chosen(&t, "batch_tokens"), Some(bt.to_string()));
        assert_eq!(chosen(&t, "epochs"), Some(epochs.to_string()));
        match n {
            10 | 100 => {
                // Distinct facts: everything is trained, and the final adapter is returned.
                assert_eq!((d.train.len(), d.val.len(), c.keep_best), (n, 0, Some(false)));
                assert_eq!(bt, (tokens.div_ceil(4).div_ceil(64) * 64).min(1024).max(longest), "{tokens} tokens");
                assert!((3..=6).contains(&per_epoch), "{per_epoch} steps an epoch");
                assert_eq!(epochs, 24u64.div_ceil(per_epoch).clamp(3, 12));
                assert!(total >= 24, "{total} steps");
            }
            _ => {
                // A large set: a tenth validates (meaningful, so the best adapter is kept), the
                // usual 3 epochs of 1024-token steps, and a rate nearer the long-run 2e-4.
                assert_eq!((d.train.len(), d.val.len(), c.keep_best), (9000, 1000, Some(true)));
                assert_eq!((bt, epochs), (1024, 3));
                let why = &t.chosen().iter().find(|c| c.setting == "batch_tokens").expect("chosen").why;
                assert!(why.starts_with("at most 1024:") && why.contains(&tokens.to_string()), "{why}");
            }
        }
        // To three significant digits, so within half a unit of the third.
        let expect_lr = 2e-4 * (720.0 / total as f32).clamp(1.0, 20.0);
        assert!((lr - expect_lr).abs() <= 5e-3 * expect_lr, "{n} records: lr {lr}, expected {expect_lr}");
        let digits = lr.to_string().trim_start_matches("0.").trim_start_matches('0').len();
        assert!(digits <= 3, "{lr} has {digits} significant digits");
        if n == 10 {
            assert_eq!(lr, 4e-3, "a short run gets the largest rate");
        }
        if n == 10_000 {
            assert!(lr < 1e-3 && total > 100, "lr {lr} over {total} steps");
        }
    }
}

#[test]
fn explicit_settings_win_and_a_resumed_run_makes_the_same_choices() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let d = fact_records(10);
    let given = TrainConfig {
        epochs: Some(2),
        learning_rate: Some(1e-3),
        batch_tokens: Some(200),
        warmup_steps: Some(0),
        keep_best: Some(true),
        ..TrainConfig::default()
    };
    let t = Trainer::new(m.clone(), &d, given.clone()).expect("trainer");
    let settings: Vec<&str> = t.chosen().iter().map(|c| c.setting.as_str()).collect();
    assert_eq!(settings, ["data.chain", "validation"], "only the data's choices are reported when all else is given");
    let c = t.config();
    assert_eq!(
        (c.epochs, c.learning_rate, c.batch_tokens, c.warmup_steps, c.keep_best),
        (Some(2), Some(1e-3), Some(200), Some(0), Some(true))
    );

    // The automatic choices again after a cancel and a resume: the same steps, rate and adapter.
    let dir = tmp("auto-resume");
    let auto = TrainConfig { lora: config().lora, ..TrainConfig::default() };
    let mut straight = Trainer::new(m.clone(), &d, auto.clone()).expect("trainer");
    let out_a = straight.run(|_| {}).expect("straight");
    let ckpt = dir.join("run.ckpt");
    let mut first = Trainer::new(m.clone(), &d, auto.clone()).expect("trainer");
    first.set_checkpoint_path(&ckpt);
    let token = first.cancel_token();
    let out_b = first
        .run(|e| {
            if let Event::Step { step: 5, .. } = e {
                token.cancel()
            }
        })
        .expect("first part");
    // Step 6 was already running when step 5's event came (the trainer does not wait between
    // steps), so the run stops after it, with its state.
    assert_eq!((out_b.reason, out_b.steps), (StopReason::Cancelled, 6));
    let mut resumed = Trainer::new(m.clone(), &d, auto).expect("trainer");
    assert_eq!(resumed.config(), straight.config(), "the resumed run resolves the same settings");
    assert_eq!(resumed.chosen(), straight.chosen());
    resumed.resume(&ckpt).expect("resume");
    assert_eq!(resumed.steps_done(), 6);
    let out_c = resumed.run(|_| {}).expect("rest");
    assert_eq!(out_c.steps, out_a.steps);
    let bits = |a: &edgetune::lora::Adapter| a.params.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out_a.adapter), bits(&out_c.adapter), "resumed adapter differs");
}

#[test]
fn a_rising_validation_loss_warns_and_the_final_adapter_is_returned_unless_the_user_gave_validation_data() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    // Held-out records state facts no training record does, so their loss rises as the
    // training records are learned (the case that used to return an untrained adapter).
    let base = TrainConfig {
        lora: config().lora,
        learning_rate: Some(3e-2),
        lr_schedule: ScheduleKind::Constant,
        // Pinned, so the scenario does not move with the automatic warmup rule.
        warmup_steps: Some(1),
        max_steps: Some(16),
        batch_tokens: Some(96),
        eval_every: 2,
        ..TrainConfig::default()
    };
    let run = |d: &Dataset, cfg: TrainConfig| {
        let mut t = Trainer::new(m.clone(), d, cfg).expect("trainer");
        let mut events = Vec::new();
        let out = t.run(|e| events.push(e.clone())).expect("run");
        let last = t.adapter().expect("download");
        (t.config().keep_best, out, last, events)
    };
    let warnings = |events: &[Event]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| if let Event::Warning { message, .. } = e { Some(message.clone()) } else { None })
            .collect()
    };
    let evals = |events: &[Event]| -> Vec<(u64, f32)> {
        events
            .iter()
            .filter_map(|e| if let Event::Eval { step, val_loss, .. } = e { Some((*step, *val_loss)) } else { None })
            .collect()
    };

    // A random share of a small set: validation exists but does not choose the adapter.
    let split = dataset("llama", 0.25);
    let (keep_best, out, last, events) = run(&split, base.clone());
    assert_eq!(keep_best, Some(false));
    let ev = evals(&events);
    let best = ev.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("evals");
    assert!(best.0 < 16 && ev.last().expect("evals").1 > best.1, "the validation loss must rise: {ev:?}");
    let w = warnings(&events);
    assert_eq!(w.len(), 1, "one warning: {w:?}");
    assert!(w[0].contains("validation loss rose") && w[0].contains("training loss fell"), "{}", w[0]);
    assert!(
        w[0].contains(&format!("at step {}", best.0)) || w[0].contains("final adapter will be returned"),
        "{}",
        w[0]
    );
    assert!(w[0].contains("val_data"), "says what to do: {}", w[0]);
    assert_eq!(out.adapter_step, 16, "the final adapter");
    assert_eq!(out.adapter.params, last.params);

    // Nine facts to train and three others as the user's own validation file: the best adapter
    // is kept, and the warning names its step.
    let dir = tmp("val-file");
    let lines = |facts: &[(&str, &str)]| -> String {
        facts
            .iter()
            .map(|(q, a)| serde_json::json!({"instruction": q, "output": a}).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (train_file, held_file) = (dir.join("train.jsonl"), dir.join("held.jsonl"));
    std::fs::write(&train_file, lines(&FACTS[..9])).expect("write");
    std::fs::write(&held_file, lines(&FACTS[9..])).expect("write");
    let tok = Tokenizer::open(&fixtures().join("tiny_llama")).expect("tokenizer");
    let cfg = DataConfig { val_data: Some(held_file), max_len: 64, ..Default::default() };
    let with_file = data::load(&train_file, &tok, &cfg).expect("loads");
    assert_eq!((with_file.train.len(), with_file.val.len()), (9, 3));
    let (keep_best, out, last, events) = run(&with_file, base);
    assert_eq!(keep_best, Some(true));
    let ev = evals(&events);
    let best = ev.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("evals");
    assert_eq!(out.adapter_step, best.0, "the adapter of the best evaluation: {ev:?}");
    assert_ne!(out.adapter.params, last.params);
    let w = warnings(&events);
    assert_eq!(w.len(), 1, "{w:?}");
    // It names the best step as of the warning (a later evaluation may still do better).
    let at = events.iter().find_map(|e| if let Event::Warning { step, .. } = e { Some(*step) } else { None });
    let best_then = ev.iter().filter(|e| Some(e.0) < at).min_by(|a, b| a.1.total_cmp(&b.1)).expect("earlier evals");
    assert!(w[0].contains(&format!("The adapter of step {} is kept", best_then.0)), "{}", w[0]);
}

/// The memory plan is made before anything is allocated: the dry run sizes the workspace exactly
/// as allocating it does, for every kind of plan.
#[test]
fn the_workspace_is_sized_before_it_is_allocated() {
    use edgetune::train::Precision;
    let ctx = ctx();
    let m = model(&ctx, "llama");
    for checkpointing in [true, false] {
        for activations in [Precision::F32, Precision::F16] {
            for dropout in [false, true] {
                let plan = WorkspacePlan { checkpointing, activations, dropout, ..WorkspacePlan::new(77, 4) };
                let before = ctx.counts().buffers;
                let planned = m.workspace_bytes(plan).expect("plan");
                assert!(ctx.counts().buffers - before <= 1, "the dry run allocates one placeholder at most");
                assert_eq!(planned, m.workspace(plan).expect("workspace").bytes, "{plan:?}");
            }
        }
    }
}

/// Settings that cannot fit are refused before allocating, where the backend reports the GPU's
/// memory, with the plan and what to change; unknown memory lets the driver decide.
#[test]
fn training_that_cannot_fit_is_refused_with_its_plan() {
    use edgetune::gpu::GpuMemory;
    use edgetune::train::TrainingBytes;
    const MIB: u64 = 1 << 20;
    let needs = TrainingBytes { weights: 700 * MIB, adapter: 40 * MIB, workspace: 900 * MIB, tokens: 2048 };
    let free = |b| Some(GpuMemory { total_bytes: 8192 * MIB, available_bytes: Some(b) });
    needs.check(free(2048 * MIB)).expect("fits in 2 GiB free");
    needs.check(None).expect("unknown memory is not refused");
    let err = needs.check(free(512 * MIB)).expect_err("does not fit").to_string();
    for part in [
        "training settings",
        "0.92 GiB more",
        "0.50 GiB",
        "700 MiB of weights",
        "900 MiB of activations",
        "2048 tokens",
        "batch_tokens",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let heap_only = Some(GpuMemory { total_bytes: 1024 * MIB, available_bytes: None });
    let err = needs.check(heap_only).expect_err("weights and the rest exceed the heap").to_string();
    assert!(err.contains("in all") && err.contains("1.00 GiB"), "{err}");
}

#[test]
fn each_epoch_trains_its_own_draw_of_chained_conversations() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let d = fact_records(10);
    assert_eq!(d.rounds.len(), data::CHAIN_ROUNDS, "{}", d.report.chaining.why);
    // The same data with the first draw in every epoch: the same first epoch, then not.
    let fixed = Dataset { rounds: vec![d.rounds[0].clone(); data::CHAIN_ROUNDS], ..d.clone() };
    let run = |d: &Dataset, steps: u64| {
        let cfg = TrainConfig { lora: config().lora, max_steps: Some(steps), ..TrainConfig::default() };
        let mut t = Trainer::new(m.clone(), d, cfg).expect("trainer");
        let per_epoch = t.steps_per_epoch();
        (t.run(|_| {}).expect("run").adapter.params, per_epoch)
    };
    let (_, per_epoch) = run(&d, 1);
    assert_eq!(per_epoch, 3, "4 + 4 + 2 records, a conversation a batch");
    assert!(run(&d, per_epoch).0 == run(&fixed, per_epoch).0, "the first epoch trains the first draw");
    assert!(run(&d, 2 * per_epoch).0 != run(&fixed, 2 * per_epoch).0, "the second epoch trained the first draw again");
}

/// Twelve preference pairs (TRL's conversational format): each question's own answer chosen,
/// the next question's answer rejected.
fn preference_dataset(val_fraction: f32) -> Dataset {
    let d = tmp("pairs");
    let lines: Vec<String> = FACTS
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let wrong = FACTS[(i + 1) % FACTS.len()].1;
            serde_json::json!({
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": wrong}],
            })
            .to_string()
        })
        .collect();
    let p = d.join("pairs.jsonl");
    std::fs::write(&p, lines.join("\n")).expect("write data");
    let tok = Tokenizer::open(&fixtures().join("tiny_llama")).expect("tokenizer");
    data::load(&p, &tok, &DataConfig { val_fraction: Some(val_fraction), max_len: 64, ..Default::default() })
        .expect("pairs load")
}

#[test]
fn dpo_resumes_to_the_same_bytes_and_reports_rewards_at_every_step_and_evaluation() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = preference_dataset(0.25);
    assert_eq!((data.train.len(), data.val.len()), (9, 3));
    let cfg = TrainConfig { method: Method::Dpo, batch_tokens: Some(160), ..config() };
    let dir = tmp("dpo-resume");
    let mut straight = Vec::new();
    let out_a = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer").run(|e| straight.push(e.clone()));
    let out_a = out_a.expect("straight run");
    let ckpt = dir.join("run.ckpt");
    let mut b = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer");
    b.set_checkpoint_path(&ckpt);
    let token = b.cancel_token();
    let out_b = b
        .run(|e| {
            if let Event::Step { step: 10, .. } = e {
                token.cancel();
            }
        })
        .expect("first half");
    assert_eq!((out_b.reason, out_b.steps), (StopReason::Cancelled, 10));
    let mut c = Trainer::new(m.clone(), &data, cfg.clone()).expect("trainer");
    c.resume(&ckpt).expect("resume");
    let mut second = Vec::new();
    let out_c = c.run(|e| second.push(e.clone())).expect("second half");
    assert_eq!(out_c.steps, 20);
    let bits = |a: &edgetune::lora::Adapter| a.params.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(&out_a.adapter) == bits(&out_c.adapter), "the resumed DPO run's adapter differs");
    let steps = |ev: &[Event]| -> Vec<(u64, u32)> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Step { step, loss, rewards, .. } if *step > 10 => {
                    assert!(rewards.is_some(), "a DPO step reports its rewards");
                    Some((*step, loss.to_bits()))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(steps(&straight), steps(&second), "steps 11..20 straight and resumed");
    // It learned the training pairs: the first step's loss is log 2 (the policy is the
    // reference), the last steps' far below, and the chosen answers' reward above the rejected.
    let step_rewards: Vec<(f32, Rewards)> = straight
        .iter()
        .filter_map(|e| if let Event::Step { loss, rewards: Some(r), .. } = e { Some((*loss, *r)) } else { None })
        .collect();
    assert!((step_rewards[0].0 - std::f32::consts::LN_2).abs() < 1e-5, "first DPO loss {}", step_rewards[0].0);
    // Below log 2 means the chosen answers' log-ratio has moved above the rejected ones'.
    let last = step_rewards[19];
    assert!(last.0 < 0.9 * std::f32::consts::LN_2 && last.1.margins > 0.0, "last step: {last:?}");
    let evals: Vec<Option<Rewards>> = straight
        .iter()
        .filter_map(|e| if let Event::Eval { rewards, .. } = e { Some(*rewards) } else { None })
        .collect();
    assert_eq!(evals.len(), 4);
    assert!(evals.iter().all(Option::is_some), "evaluations of pairs report rewards");
    std::fs::remove_dir_all(&dir).ok();
}

/// DPO with f16 activations: the reference's log-probabilities come through the same f16 path
/// as the policy's, so the first step is level (loss log 2, both ways of getting the
/// reference); two runs agree to the bit, and the pairs are learned.
#[test]
fn dpo_with_f16_activations_starts_level_learns_and_repeats_to_the_bit() {
    use edgetune::train::{DpoReference, Precision};
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let data = preference_dataset(0.25);
    let run = |activations: Precision, reference: DpoReference| -> Vec<(f32, Rewards)> {
        let dpo = DpoConfig { reference: Some(reference), ..Default::default() };
        let cfg = TrainConfig { method: Method::Dpo, dpo, activations, batch_tokens: Some(160), ..config() };
        let mut steps = Vec::new();
        let out = Trainer::new(m.clone(), &data, cfg)
            .expect("trainer")
            .run(|e| {
                if let Event::Step { loss, rewards: Some(r), .. } = e {
                    steps.push((*loss, *r));
                }
            })
            .expect("runs");
        assert_eq!((out.reason, steps.len()), (StopReason::Completed, 20));
        steps
    };
    let f16 = run(Precision::F16, DpoReference::Precomputed);
    let again = run(Precision::F16, DpoReference::Precomputed);
    let in_step = run(Precision::F16, DpoReference::InStep);
    let f32 = run(Precision::F32, DpoReference::Precomputed);
    assert!(f16 == again && f16 == in_step, "f16 DPO runs differ (again, or with the reference in each step)");
    assert!((f16[0].0 - std::f32::consts::LN_2).abs() < 1e-6 && f16[0].1.margins == 0.0, "first step {:?}", f16[0]);
    let last = f16[19];
    assert!(last.0 < 0.9 * std::f32::consts::LN_2 && last.1.margins > 0.0, "last step: {last:?}");
    assert_ne!(f16, f32, "f16 activations changed nothing");
}

#[test]
fn the_method_must_fit_the_data() {
    let ctx = ctx();
    let m = model(&ctx, "llama");
    let e = Trainer::new(m.clone(), &preference_dataset(0.0), config()).expect_err("pairs under SFT").to_string();
    assert!(e.contains("method = \"dpo\""), "{e}");
    let dpo = TrainConfig { method: Method::Dpo, ..config() };
    let e = Trainer::new(m.clone(), &dataset("llama", 0.0), dpo).expect_err("chat records under DPO").to_string();
    assert!(e.contains("preference pairs") && e.contains("persona.jsonl:1"), "{e}");
    let bad = TrainConfig {
        method: Method::Dpo,
        dpo: DpoConfig { beta: 0.0, label_smoothing: 0.5, ..Default::default() },
        ..config()
    };
    let e = Trainer::new(m.clone(), &preference_dataset(0.0), bad).expect_err("bad DPO settings").to_string();
    assert!(e.contains("dpo: beta must be") && e.contains("label_smoothing must be in [0, 0.5) (got 0.5)"), "{e}");
    let ipo = DpoConfig { loss: edgetune::train::DpoLossKind::Ipo, label_smoothing: 0.1, ..Default::default() };
    let bad = TrainConfig { method: Method::Dpo, dpo: ipo, ..config() };
    let e = Trainer::new(m, &preference_dataset(0.0), bad).expect_err("IPO with label smoothing").to_string();
    assert!(e.contains("does not apply to loss = \"ipo\""), "{e}");
}

/// Answers scored at the evaluation points are those of the adapter as it is then: with the
/// final adapter's own answers as the references, the last evaluation scores 1 on every count,
/// the first (an earlier adapter) and the base model less, as `Session::score_answers` has them;
/// scoring does not disturb training. A run without validation samples has no evaluation points
/// to score at; an exchange past the context is refused before the run.
#[test]
fn answers_scored_at_evaluations_are_those_of_the_adapter_then() {
    use edgetune::Session;
    use edgetune::data::formats::{Record, Sourced};
    use edgetune::infer::GenerateOptions;
    use edgetune::tokenizer::Message;
    use edgetune::train::AnswerEval;

    let ctx = ctx();
    let path = fixtures().join("tiny_llama");
    let mut session = Session::open_with(ctx, &path, &LoadOptions::default()).expect("session");
    let cfg = TrainConfig { max_steps: Some(10), eval_every: 5, keep_best: Some(false), ..config() };
    let data = dataset("llama", 0.25);
    let plain = Trainer::new(session.model.clone(), &data, cfg.clone()).expect("trainer").run(|_| {}).expect("runs");
    // The references: the final adapter's own greedy answers.
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    session.set_adapter(Some(&plain.adapter)).expect("adapter");
    let records: Vec<Sourced> = FACTS[..3]
        .iter()
        .enumerate()
        .map(|(i, (q, _))| {
            let prompt = vec![Message::new("user", *q)];
            let answer = session.chat(&prompt, &opts, |_| true).expect("answer").text;
            let record = Record::Chat(vec![Message::new("user", *q), Message::new("assistant", answer)]);
            Sourced { record, file: PathBuf::from("held-out"), line: i + 1 }
        })
        .collect();
    let eval = AnswerEval {
        tokenizer: Arc::new(Tokenizer::open(&path).expect("tokenizer")),
        exchanges: data::exchanges(&records, None).expect("exchanges"),
        opts: opts.clone(),
    };
    let mut trainer = Trainer::new(session.model.clone(), &data, cfg.clone()).expect("trainer");
    trainer.score_answers_at_evals(eval.clone()).expect("scored answers");
    let mut seen = Vec::new();
    let out = trainer
        .run(|e| {
            if let Event::Eval { step, answers, .. } = e {
                seen.push((*step, answers.expect("every evaluation scores the answers")));
            }
        })
        .expect("runs");
    assert_eq!(out.adapter.params, plain.adapter.params, "scoring answers does not disturb training");
    let report = session.score_answers(&records, None, &opts, |_, _| {}).expect("scores");
    for a in &report.answers {
        eprintln!("{}: base {:?}, adapter {:?}", a.question, a.base, a.adapter);
    }
    eprintln!("{seen:?}");
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [5, 10]);
    // Exact match and F1 of an answer against itself are 1 (ROUGE-L, as rouge-score, is 0 for
    // an empty answer, which the tiny model may give).
    let last = seen[1].1.adapter;
    assert_eq!(Some(last), report.adapter, "the last evaluation scores the final adapter");
    assert_eq!((last.exact, last.f1), (1.0, 1.0), "{seen:?}");
    assert!(seen.iter().all(|(_, a)| a.base == report.base), "the base's scores: {seen:?} vs {:?}", report.base);
    assert!(report.base.exact < 1.0 && seen[0].1.adapter.exact < 1.0, "earlier answers differ: {seen:?}");

    // No validation samples, no evaluation points: an error that says what to give.
    let mut none = Trainer::new(session.model.clone(), &dataset("llama", 0.0), cfg.clone()).expect("trainer");
    let e = none.score_answers_at_evals(eval.clone()).expect_err("no validation").to_string();
    assert!(e.contains("no validation samples") && e.contains("val_data"), "{e}");
    // An exchange whose prompt does not fit the context: refused by its file and line before
    // the run, which would otherwise stop at its first evaluation.
    let mut long = eval;
    let too_long = vec![Message::new("user", "word ".repeat(4 * session.model.max_context))];
    long.exchanges[1].prompt = too_long;
    let mut t = Trainer::new(session.model.clone(), &data, cfg).expect("trainer");
    let e = t.score_answers_at_evals(long).expect_err("too long").to_string();
    assert!(e.contains("held-out line 2") && e.contains("do not fit the context"), "{e}");
}
