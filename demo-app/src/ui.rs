//! The window: setup, data and training on the left; the loss plot and the side-by-side chat
//! on the right. Everything it shows comes from [`AppState`]; every button calls one of its
//! methods.

use std::sync::Arc;

use eframe::egui::{self, Color32, RichText, Stroke};

use crate::fetch::Stage;
use crate::state::{AppState, PathField, Phase, human_bytes};

/// The eframe app.
#[derive(Debug)]
pub struct DemoApp {
    pub state: AppState,
}

impl DemoApp {
    /// Creates the app and starts opening the GPU.
    pub fn new(ctx: &egui::Context) -> Self {
        let repaint_ctx = ctx.clone();
        let mut state = AppState::new(Arc::new(move || repaint_ctx.request_repaint()));
        state.open_gpu();
        DemoApp { state }
    }
}

const LOSS: Color32 = Color32::from_rgb(70, 130, 220);
const VAL: Color32 = Color32::from_rgb(230, 140, 40);
const LR: Color32 = Color32::from_rgb(90, 170, 90);
const MARGIN: Color32 = Color32::from_rgb(170, 80, 190);

impl eframe::App for DemoApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.state.poll();
        egui::Panel::left("setup").resizable(true).default_size(380.0).show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| setup_panel(ui, &mut self.state));
        });
        egui::CentralPanel::default().show(ui, |ui| {
            status_line(ui, &self.state);
            ui.separator();
            training_panel(ui, &mut self.state);
            ui.separator();
            chat_panel(ui, &mut self.state);
        });
    }
}

fn status_line(ui: &mut egui::Ui, s: &AppState) {
    if let Some(e) = &s.error {
        ui.colored_label(Color32::from_rgb(200, 60, 60), format!("Error: {e}"));
    } else if let Some(busy) = &s.busy {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("{busy}..."));
        });
    } else if let Some(n) = &s.notice {
        ui.label(n);
    } else {
        ui.label("Pick a model and your data, then train.");
    }
}

fn setup_panel(ui: &mut egui::Ui, s: &mut AppState) {
    ui.heading("GPU");
    match &s.gpu {
        Some(g) => {
            ui.label(format!("{} ({}, {})", g.name, g.backend, g.device_type));
            let memory = match s.memory {
                Some(m) => match m.available_bytes {
                    Some(free) => format!("memory {}, {} free", human_bytes(m.total_bytes), human_bytes(free)),
                    None => format!("memory {}", human_bytes(m.total_bytes)),
                },
                None => format!("memory: not reported by {}", g.backend),
            };
            ui.label(format!("{memory}; largest buffer {}", human_bytes(g.max_buffer_size)));
        }
        None => {
            ui.label("opening...");
        }
    }

    ui.separator();
    ui.heading("Model");
    path_field(ui, "Model path", &mut s.model_path, "a Hugging Face folder or a .gguf file");
    browse_and_load(
        ui,
        s,
        [PathField::ModelFile, PathField::ModelFolder],
        "Load model",
        AppState::can_load_model,
        AppState::load_model,
    );
    default_model(ui, s);
    if let Some(m) = &s.model {
        ui.label(format!(
            "{}: {}, {} layers, {:.1} M parameters, {} on the GPU (4-bit)",
            s.model_name(),
            m.architecture,
            m.layers,
            m.parameters as f64 / 1e6,
            human_bytes(m.weight_bytes)
        ));
    }

    ui.separator();
    ui.heading("Data");
    path_field(ui, "Data path", &mut s.data_path, "a JSONL file of chats, or a folder of your notes");
    browse_and_load(
        ui,
        s,
        [PathField::DataFile, PathField::DataFolder],
        "Load data",
        AppState::can_load_data,
        AppState::load_data,
    );
    if let Some(d) = &s.data {
        let r = &d.report;
        ui.label(format!(
            "{} records, {} training / {} validation samples, {} tokens",
            r.records, r.train_samples, r.val_samples, r.train_tokens
        ));
        let dropped = [
            (r.bad_records, "bad records"),
            (r.duplicates, "duplicates"),
            (r.too_short, "too short"),
            (r.dropped_too_long, "too long"),
            (r.truncated, "truncated"),
        ];
        let dropped: Vec<String> = dropped.iter().filter(|(n, _)| *n > 0).map(|(n, w)| format!("{n} {w}")).collect();
        if !dropped.is_empty() {
            ui.label(format!("left out or cut: {}", dropped.join(", ")));
        }
        egui::CollapsingHeader::new("Preview (as the chat template renders it)").show(ui, |ui| {
            for p in &d.previews {
                ui.label(RichText::new(p).monospace().small());
                ui.separator();
            }
        });
    }

    ui.separator();
    ui.heading("Training");
    let chosen = |name: &str| s.chosen.iter().find(|c| c.setting == name).map(|c| c.value.clone());
    let (auto_epochs, auto_lr) = (chosen("epochs"), chosen("learning_rate"));
    let others: Vec<String> = s
        .chosen
        .iter()
        .filter(|c| c.setting != "epochs" && c.setting != "learning_rate")
        .map(|c| format!("{} = {}", c.setting, c.value))
        .collect();
    let st = &mut s.settings;
    ui.horizontal(|ui| {
        ui.label("Epochs");
        auto_field(ui, "epochs", &mut st.epochs, 3, auto_epochs, |ui, v| {
            ui.add(egui::DragValue::new(v).range(1..=100));
        });
    });
    if !others.is_empty() {
        ui.label(RichText::new(format!("Chosen from the data: {}", others.join(", "))).small())
            .on_hover_text("Settings left on auto are chosen from the data; set them in Advanced to override.");
    }
    egui::CollapsingHeader::new("Advanced").show(ui, |ui| {
        egui::Grid::new("advanced").num_columns(2).show(ui, |ui| {
            ui.label("LoRA rank r");
            ui.add(egui::DragValue::new(&mut st.rank).range(1..=256));
            ui.end_row();
            ui.label("alpha");
            ui.add(egui::DragValue::new(&mut st.alpha).range(1.0..=512.0));
            ui.end_row();
            ui.label("learning rate");
            auto_field(ui, "learning rate", &mut st.learning_rate, 2e-4, auto_lr, |ui, v| {
                ui.add(egui::DragValue::new(v).range(1e-6..=1e-1).speed(1e-4));
            });
            ui.end_row();
            ui.label("max steps");
            ui.horizontal(|ui| {
                let mut on = st.max_steps.is_some();
                if ui.checkbox(&mut on, "").changed() {
                    st.max_steps = on.then_some(100);
                }
                match &mut st.max_steps {
                    Some(v) => {
                        ui.add(egui::DragValue::new(v).range(1..=100_000));
                    }
                    None => {
                        ui.label("off: epochs decide");
                    }
                }
            });
            ui.end_row();
            ui.label("sequence length");
            ui.add(egui::DragValue::new(&mut st.max_len).range(16..=8192));
            ui.end_row();
            ui.label("target modules");
            ui.horizontal(|ui| {
                ui.radio_value(&mut st.all_linear, true, "all linear");
                ui.radio_value(&mut st.all_linear, false, "q, v");
            });
            ui.end_row();
            ui.label("gradient checkpointing");
            ui.checkbox(&mut st.gradient_checkpointing, "");
            ui.end_row();
        });
    });
    if let Some(estimate) = s.estimate_bytes() {
        match estimate {
            Ok(b) => ui.label(match s.memory {
                Some(m) => {
                    format!("GPU memory for training: about {} of {}", human_bytes(b), human_bytes(m.total_bytes))
                }
                None => format!("GPU memory for training: about {}", human_bytes(b)),
            }),
            Err(e) => ui.colored_label(Color32::from_rgb(200, 60, 60), format!("These settings will not work: {e}")),
        };
    }
    ui.horizontal(|ui| {
        if ui.add_enabled(s.can_train(), egui::Button::new("Train")).clicked() {
            s.start_training();
        }
        let running = s.phase == Phase::Running;
        if s.phase.is_active() && ui.button(if running { "Pause" } else { "Resume" }).clicked() {
            if running { s.pause() } else { s.resume() }
        }
        if ui.add_enabled(s.phase.is_active(), egui::Button::new("Cancel")).clicked() {
            s.cancel();
        }
    });

    ui.separator();
    ui.heading("Adapter");
    match &s.adapter {
        Some((_, label)) => ui.label(format!("personalized adapter: {label}")),
        None => ui.label("none yet: train one, or load an earlier one"),
    };
    path_field(ui, "Adapter folder", &mut s.adapter_path, "a PEFT adapter folder");
    ui.horizontal(|ui| {
        browse(ui, s, "Folder...", PathField::AdapterFolder);
        if ui.add_enabled(s.adapter.is_some(), egui::Button::new("Save adapter")).clicked() {
            s.save_adapter();
        }
        if ui.add_enabled(s.can_chat(), egui::Button::new("Load adapter")).clicked() {
            s.load_adapter();
        }
    });
}

/// A button that opens a file dialog for `field`.
fn browse(ui: &mut egui::Ui, s: &mut AppState, text: &str, field: PathField) {
    let idle = !s.picking && s.busy.is_none() && !s.phase.is_active();
    if ui.add_enabled(idle, egui::Button::new(text)).clicked() {
        s.pick(field);
    }
}

/// File... and Folder... for a path, then the button that loads it.
fn browse_and_load(
    ui: &mut egui::Ui,
    s: &mut AppState,
    [file, folder]: [PathField; 2],
    load: &str,
    can_load: fn(&AppState) -> bool,
    on_load: fn(&mut AppState),
) {
    ui.horizontal(|ui| {
        browse(ui, s, "File...", file);
        browse(ui, s, "Folder...", folder);
        if ui.add_enabled(can_load(s), egui::Button::new(load)).clicked() {
            on_load(s);
        }
    });
}

/// The default model: a button that fetches it (once) and loads it, and the download's progress.
fn default_model(ui: &mut egui::Ui, s: &mut AppState) {
    let name = "SmolLM2-135M-Instruct";
    if let Some(p) = s.fetch {
        ui.horizontal(|ui| {
            let what = match p.stage {
                Stage::Locating => "finding",
                Stage::Downloading => "downloading",
                Stage::Unpacking => "unpacking",
            };
            let size = p.total.map_or(String::new(), |t| format!(" of {}", human_bytes(t)));
            let text = format!("{what} {name}: {}{size}", human_bytes(p.done));
            let fraction = p.fraction().unwrap_or(0.0);
            ui.add(egui::ProgressBar::new(fraction).text(text).desired_width(ui.available_width() - 60.0));
            if ui.button("Stop").clicked() {
                s.cancel_fetch();
            }
        });
        return;
    }
    let label = if s.model_source.is_cached() {
        format!("Use the default model, {name}")
    } else {
        format!("Download the default model, {name} (93 MB)")
    };
    if ui.add_enabled(s.can_fetch() && s.can_load_model(), egui::Button::new(label)).clicked() {
        s.fetch_default_model();
    }
}

/// A labelled one-line path field that fills the panel's width.
fn path_field(ui: &mut egui::Ui, label: &str, value: &mut String, hint: &str) {
    ui.horizontal(|ui| {
        let label = ui.label(label);
        let edit = egui::TextEdit::singleline(value).hint_text(hint).desired_width(ui.available_width());
        ui.add(edit).labelled_by(label.id);
    });
}

fn training_panel(ui: &mut egui::Ui, s: &mut AppState) {
    let p = &s.progress;
    let phase = match &s.phase {
        Phase::Idle => "not started".to_string(),
        Phase::Running => "training".into(),
        Phase::Paused => "paused".into(),
        Phase::Finished(r) => r.clone(),
        Phase::Failed(_) => "failed".into(),
    };
    let last = p.steps.last();
    ui.horizontal_wrapped(|ui| {
        ui.label(RichText::new(format!("step {}/{}", p.last_step(), p.total_steps)).strong());
        ui.label(format!("({phase})"));
        if let Some((_, loss, lr)) = last {
            ui.colored_label(LOSS, format!("loss {loss:.4}"));
            ui.colored_label(LR, format!("lr {lr:.2e}"));
        }
        if let Some((_, v)) = p.evals.last() {
            ui.colored_label(VAL, format!("validation {v:.4}"));
        }
        if let Some((_, m, a)) = p.margins.last() {
            ui.colored_label(MARGIN, format!("reward margin {m:.3}"))
                .on_hover_text("how much more the adapter prefers your chosen answers than the start did");
            ui.label(format!("pairs ranked your way {:.0}%", a * 100.0));
        }
        if last.is_some() {
            ui.label(format!("{:.0} tokens/s", p.tokens_per_s));
            ui.label(format!("ETA {:.0} s", p.eta_s));
            ui.label(format!("GPU {}", human_bytes(p.gpu_memory_bytes)));
        }
    });
    plot(ui, s);
    for w in s.progress.warnings.iter().rev().take(2) {
        ui.colored_label(VAL, w);
    }
    if let Some(r) = &s.scores {
        held_out_scores(ui, r);
    }
}

/// The held-out answers after a run: the means, base against adapter, and each answer.
fn held_out_scores(ui: &mut egui::Ui, r: &edgetune::session::AnswerReport) {
    let Some(tuned) = r.adapter else { return };
    let n = r.answers.len();
    ui.label(format!(
        "Held-out answers ({n}, not trained on), base -> personalized: exact match {:.2} -> {:.2}, token F1 {:.2} -> \
         {:.2}, ROUGE-L {:.2} -> {:.2}",
        r.base.exact, tuned.exact, r.base.f1, tuned.f1, r.base.rouge_l, tuned.rouge_l
    ));
    egui::CollapsingHeader::new("Each held-out answer").show(ui, |ui| {
        for a in &r.answers {
            ui.label(RichText::new(&a.question).strong());
            ui.label(format!("expected: {}", a.reference));
            ui.label(format!("base: {}", a.base));
            ui.label(format!("personalized: {}", a.adapter.as_deref().unwrap_or("")));
            ui.separator();
        }
    });
}

/// Training loss (line), validation loss (dots) on one scale; learning rate on its own; for a
/// run on feedback, the reward margin on its own scale from 0.
fn plot(ui: &mut egui::Ui, s: &AppState) {
    let p = &s.progress;
    let size = egui::vec2(ui.available_width(), 180.0);
    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_stroke(rect, 2.0, Stroke::new(1.0, ui.visuals().weak_text_color()), egui::StrokeKind::Inside);
    if p.steps.is_empty() {
        painter.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "the loss appears here as training runs",
            egui::FontId::proportional(13.0),
            ui.visuals().weak_text_color(),
        );
        return;
    }
    let max_step = p.total_steps.max(p.last_step()).max(1) as f32;
    let losses = p.steps.iter().map(|s| s.1).chain(p.evals.iter().map(|e| e.1)).filter(|l| l.is_finite());
    let (lo, hi) = losses.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), l| (a.min(l), b.max(l)));
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, lo + 0.5) };
    let lr_max = p.steps.iter().map(|s| s.2).fold(0.0f32, f32::max).max(f32::MIN_POSITIVE);
    let inner = rect.shrink(8.0);
    let at = |step: u64, y01: f32| {
        egui::pos2(inner.left() + inner.width() * step as f32 / max_step, inner.bottom() - inner.height() * y01)
    };
    let lr_line: Vec<_> = p.steps.iter().map(|s| at(s.0, s.2 / lr_max)).collect();
    painter.add(egui::Shape::line(lr_line, Stroke::new(1.0, LR)));
    let loss_line: Vec<_> = p.steps.iter().map(|s| at(s.0, (s.1 - lo) / (hi - lo))).collect();
    painter.add(egui::Shape::line(loss_line, Stroke::new(2.0, LOSS)));
    for (step, v) in &p.evals {
        painter.circle_filled(at(*step, (v - lo) / (hi - lo)), 4.0, VAL);
    }
    let finite = p.margins.iter().map(|m| m.1).filter(|m| m.is_finite());
    let (m_lo, m_hi) = finite.fold((0f32, 0f32), |(a, b), m| (a.min(m), b.max(m)));
    if !p.margins.is_empty() && m_hi > m_lo {
        let margin_line: Vec<_> = p.margins.iter().map(|m| at(m.0, (m.1 - m_lo) / (m_hi - m_lo))).collect();
        painter.add(egui::Shape::line(margin_line, Stroke::new(2.0, MARGIN)));
        let top = egui::FontId::proportional(11.0);
        painter.text(inner.right_top(), egui::Align2::RIGHT_TOP, format!("margin {m_hi:.2}"), top, MARGIN);
    }
    let small = egui::FontId::proportional(11.0);
    let weak = ui.visuals().weak_text_color();
    painter.text(inner.left_top(), egui::Align2::LEFT_TOP, format!("{hi:.3}"), small.clone(), weak);
    painter.text(inner.left_bottom(), egui::Align2::LEFT_BOTTOM, format!("{lo:.3}"), small.clone(), weak);
    painter.text(inner.right_bottom(), egui::Align2::RIGHT_BOTTOM, format!("step {max_step:.0}"), small, weak);
}

fn chat_panel(ui: &mut egui::Ui, s: &mut AppState) {
    ui.heading("Try it");
    ui.horizontal(|ui| {
        let label = ui.label("Ask");
        let edit = ui.add(egui::TextEdit::singleline(&mut s.chat.prompt).desired_width(ui.available_width() - 80.0));
        let edit = edit.labelled_by(label.id);
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.add_enabled(s.can_chat(), egui::Button::new("Answer")).clicked() || enter) && s.can_chat() {
            s.ask();
        }
    });
    let can_prefer = s.can_prefer();
    let mut preferred = None;
    ui.columns(2, |cols| {
        cols[0].label(RichText::new("Base model").strong());
        cols[0].label(&s.chat.base);
        let title = if s.adapter.is_some() { "Personalized" } else { "Personalized (train or load an adapter)" };
        cols[1].label(RichText::new(title).strong());
        cols[1].label(&s.chat.tuned);
        for (col, tuned) in [(0, false), (1, true)] {
            let which = if tuned { "personalized" } else { "base" };
            let button = egui::Button::new(if tuned { "Personalized is better" } else { "Base is better" });
            if cols[col]
                .add_enabled(can_prefer, button)
                .on_hover_text(format!("prefer the {which} answer to the other one"))
                .clicked()
            {
                preferred = Some(tuned);
            }
        }
    });
    if let Some(tuned) = preferred {
        s.prefer(tuned);
    }
    if s.chat.busy {
        ui.spinner();
    }
    ui.horizontal(|ui| {
        let label = ui.label("The answer I wanted");
        let edit = egui::TextEdit::singleline(&mut s.chat.wanted)
            .hint_text("better than both answers above")
            .desired_width(ui.available_width() - 80.0);
        ui.add(edit).labelled_by(label.id);
        if ui.add_enabled(s.can_add_wanted(), egui::Button::new("Add")).clicked() {
            s.add_wanted();
        }
    });
    ui.horizontal(|ui| {
        let n = s.feedback.len();
        ui.label(format!("Feedback: {n} preference pair{}", if n == 1 { "" } else { "s" }));
        let train = egui::Button::new("Train on my feedback");
        let hint = "DPO on the pairs, starting from the personalized adapter (or a new one)";
        if ui.add_enabled(s.can_train_feedback(), train).on_hover_text(hint).clicked() {
            s.train_on_feedback();
        }
        if ui.add_enabled(n > 0 && !s.phase.is_active(), egui::Button::new("Clear feedback")).clicked() {
            s.feedback.clear();
        }
    });
}

/// A setting that is either chosen from the data (auto, showing the value the rule chose for
/// the loaded data) or set by hand.
fn auto_field<T: Copy + std::str::FromStr>(
    ui: &mut egui::Ui,
    name: &str,
    value: &mut Option<T>,
    manual: T,
    chosen: Option<String>,
    edit: impl FnOnce(&mut egui::Ui, &mut T),
) {
    ui.horizontal(|ui| {
        let mut auto = value.is_none();
        if ui.checkbox(&mut auto, "auto").on_hover_text(format!("choose the {name} from the data")).changed() {
            // Unticked, the field starts from the value the rule chose.
            *value = if auto { None } else { Some(chosen.as_deref().and_then(|c| c.parse().ok()).unwrap_or(manual)) };
        }
        match value {
            Some(v) => edit(ui, v),
            None => {
                ui.label(chosen.unwrap_or_else(|| "(load data to see)".into()));
            }
        }
    });
}
