//! The demo app driven through its real UI by egui_kittest (rendered with wgpu on the adapter
//! it finds: lavapipe in CI): load the tiny test model and the persona data, train a few steps,
//! pause and resume, answer a question with the base model and the adapter side by side, save
//! the adapter, and keep a screenshot under the target folder.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{ask, harness, load_model_and_data, repo, screenshot, type_into, wait};
use edgetune_demo::state::Phase;
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

    // Small, fast settings (as the advanced section would set them).
    {
        let s = &mut harness.state_mut().state.settings;
        (s.rank, s.alpha, s.max_steps, s.max_len, s.learning_rate) = (4, 8.0, 8, 128, 1e-2);
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

    // Base and personalized answers, side by side.
    ask(&mut harness, "Who are you?", minute);
    let chat = &harness.state().state.chat;
    assert!(!chat.base.is_empty() && !chat.tuned.is_empty(), "{chat:?}");

    // Save the adapter as a PEFT folder.
    let dir = std::env::temp_dir().join(format!("edgetune-demo-adapter-{}", std::process::id()));
    type_into(&mut harness, "Adapter folder", &dir.display().to_string());
    harness.get_by_label("Save adapter").click();
    harness.run_steps(2);
    assert!(dir.join("adapter_model.safetensors").exists(), "{:?}", harness.state().state.error);

    screenshot(&mut harness, &screenshot_path());
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
