//! `cargo run --release -p edgetune-demo`: opens the demo window.

fn main() -> eframe::Result {
    let options = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("edgetune: personalize a model")
            .with_inner_size([1200.0, 800.0]),
        ..Default::default()
    };
    eframe::run_native("edgetune demo", options, Box::new(|cc| Ok(Box::new(edgetune_demo::DemoApp::new(&cc.egui_ctx)))))
}
