//! Driving the demo through its UI with egui_kittest, shared by the tests and the screenshot
//! example.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgetune_demo::DemoApp;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

pub mod pypi;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The app in a headless harness rendered with wgpu. Generated text may hold characters the
/// default fonts lack (the tiny random model writes U+FFFD): they are drawn as boxes, as in the
/// app. The UI's own text is checked by a test.
pub fn harness() -> Harness<'static, DemoApp> {
    Harness::builder()
        .with_size([1200.0, 800.0])
        .allow_missing_glyphs()
        .wgpu()
        .build_eframe(|cc| DemoApp::new(&cc.egui_ctx))
}

/// Steps the UI until `done` holds; fails after `limit` or on an error banner.
pub fn wait(harness: &mut Harness<'_, DemoApp>, what: &str, limit: Duration, done: impl Fn(&DemoApp) -> bool) {
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
pub fn type_into(harness: &mut Harness<'_, DemoApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.run_steps(1);
    harness.get_by_label(label).type_text(text);
    harness.run_steps(2);
}

/// Types the model's path and loads it, then the data's.
pub fn load_model_and_data(harness: &mut Harness<'_, DemoApp>, model: &str, data: &str, limit: Duration) {
    wait(harness, "the GPU", limit, |a| a.state.gpu.is_some());
    harness.state_mut().state.model_path.clear();
    type_into(harness, "Model path", model);
    assert_eq!(harness.state().state.model_path, model, "typing into the model field reaches the state");
    harness.get_by_label("Load model").click();
    wait(harness, "the model", limit, |a| a.state.model.is_some() && a.state.busy.is_none());
    type_into(harness, "Data path", data);
    harness.get_by_label("Load data").click();
    wait(harness, "the data", limit, |a| a.state.data.is_some() && a.state.busy.is_none());
}

/// Asks the question in the chat box and waits for both answers.
pub fn ask(harness: &mut Harness<'_, DemoApp>, question: &str, limit: Duration) {
    harness.state_mut().state.chat.prompt.clear();
    type_into(harness, "Ask", question);
    harness.get_by_label("Answer").click();
    harness.run_steps(1);
    assert!(harness.state().state.chat.busy, "the click starts generation");
    wait(harness, "the answers", limit, |a| !a.state.chat.busy);
}

/// Renders the window and writes it as a PNG.
pub fn screenshot(harness: &mut Harness<'_, DemoApp>, path: &Path) {
    let image = harness.render().expect("the UI renders");
    std::fs::create_dir_all(path.parent().expect("folder")).expect("screenshot folder");
    image.save(path).expect("screenshot written");
    eprintln!("screenshot: {}", path.display());
}
