//! The demo app driven through its real UI by egui_kittest (rendered with wgpu on the adapter
//! it finds: lavapipe in CI): load the tiny test model and the persona data, train a few steps,
//! pause and resume, answer a question with the base model and the adapter side by side, save
//! the adapter, and keep a screenshot under the target folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgetune_demo::DemoApp;
use edgetune_demo::state::Phase;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Steps the UI until `done` holds, failing after `limit`.
fn wait(harness: &mut Harness<'_, DemoApp>, what: &str, limit: Duration, done: impl Fn(&DemoApp) -> bool) {
    let start = Instant::now();
    while !done(harness.state()) {
        assert!(start.elapsed() < limit, "timed out waiting for {what}: {:?}", harness.state().state);
        if let Some(e) = &harness.state().state.error {
            panic!("error while waiting for {what}: {e}");
        }
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.step();
}

/// Clicks into the text field labelled `label` and types `text`, as a user would.
fn type_into(harness: &mut Harness<'_, DemoApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.run_steps(1);
    harness.get_by_label(label).type_text(text);
    harness.run_steps(2);
}

fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(repo().join("target"));
    target.join("demo-app/screenshot.png")
}

#[test]
fn train_pause_resume_and_chat_through_the_ui() {
    // Generated text may hold characters the default fonts lack (the tiny random model writes
    // U+FFFD): they are drawn as boxes, as in the app. The UI's own text is checked below.
    let mut harness = Harness::builder()
        .with_size([1200.0, 800.0])
        .allow_missing_glyphs()
        .wgpu()
        .build_eframe(|cc| DemoApp::new(&cc.egui_ctx));
    let minute = Duration::from_secs(60);
    wait(&mut harness, "the GPU", minute, |a| a.state.gpu.is_some());

    // The user types the model's path and loads it.
    harness.state_mut().state.model_path.clear();
    let model = repo().join("tests/reference/fixtures/tiny_llama").display().to_string();
    type_into(&mut harness, "Model path", &model);
    assert_eq!(harness.state().state.model_path, model, "typing into the model field reaches the state");
    harness.get_by_label("Load model").click();
    wait(&mut harness, "the model", minute, |a| a.state.model.is_some() && a.state.busy.is_none());

    let data = repo().join("sdk/data/persona/train.jsonl").display().to_string();
    type_into(&mut harness, "Data path", &data);
    harness.get_by_label("Load data").click();
    wait(&mut harness, "the data", minute, |a| a.state.data.is_some() && a.state.busy.is_none());
    let report = harness.state().state.data.as_ref().expect("data").report.clone();
    assert_eq!(report.records, 39);
    assert!(report.train_samples > 0 && report.val_samples > 0);
    assert!(!harness.state().state.data.as_ref().expect("data").previews.is_empty());

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
    harness.get_by_label("Answer").click();
    harness.run_steps(1);
    assert!(harness.state().state.chat.busy, "the click starts generation");
    wait(&mut harness, "the answers", minute, |a| !a.state.chat.busy);
    let chat = &harness.state().state.chat;
    assert!(!chat.base.is_empty() && !chat.tuned.is_empty(), "{chat:?}");

    // Save the adapter as a PEFT folder.
    let dir = std::env::temp_dir().join(format!("edgetune-demo-adapter-{}", std::process::id()));
    type_into(&mut harness, "Adapter folder", &dir.display().to_string());
    harness.get_by_label("Save adapter").click();
    harness.run_steps(2);
    assert!(dir.join("adapter_model.safetensors").exists(), "{:?}", harness.state().state.error);

    let image = harness.render().expect("the UI renders");
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().expect("folder")).expect("screenshot folder");
    image.save(&path).expect("screenshot written");
    eprintln!("screenshot: {}", path.display());
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
