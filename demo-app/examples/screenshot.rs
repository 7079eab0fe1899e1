//! Drives the demo through its UI on a real model and writes a screenshot after training: the
//! picture in the README. It takes minutes on a CPU rasterizer.
//!
//! cargo run --release -p edgetune-demo --example screenshot -- MODEL DATA OUT.png [EPOCHS] [QUESTION]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use edgetune_demo::state::Phase;
use egui_kittest::kittest::Queryable;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=5).contains(&args.len()) {
        eprintln!("usage: screenshot MODEL DATA OUT.png [EPOCHS] [QUESTION]");
        std::process::exit(2);
    }
    let epochs = args.get(3).map_or(Ok(3), |e| e.parse()).unwrap_or_else(|e| panic!("EPOCHS: {e}"));
    let question = args.get(4).cloned().unwrap_or_else(|| "What do you drink in the morning?".into());
    let hour = Duration::from_secs(3600);
    let mut harness = common::harness();
    common::load_model_and_data(&mut harness, &args[0], &args[1], hour);
    {
        let s = &mut harness.state_mut().state.settings;
        (s.epochs, s.learning_rate, s.max_len) = (Some(epochs), Some(3e-3), 128);
    }
    harness.run_steps(2);
    harness.get_by_label("Train").click();
    common::wait(&mut harness, "the end of training", hour, |a| matches!(a.state.phase, Phase::Finished(_)));
    common::ask(&mut harness, &question, hour);
    common::screenshot(&mut harness, Path::new(&args[2]));
}
