//! The demo's state and what it does, without a window: the UI in `ui.rs` draws this state and
//! calls its methods. Slow work (opening the GPU, loading the model and the data, training,
//! generating) runs on worker threads that report back through a channel; [`AppState::poll`]
//! applies their messages, so the UI thread never waits on the GPU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use edgetune::Session;
use edgetune::data::formats::{Format, Preference, Record, Sourced};
use edgetune::data::{self, DataReport, Dataset, Source};
use edgetune::gpu::{AdapterReport, GpuContext, GpuMemory, GpuOptions};
use edgetune::infer::GenerateOptions;
use edgetune::lora::{Adapter, TargetModules, peft};
use edgetune::model::llama::LoadOptions;
use edgetune::session::AnswerReport;
use edgetune::tokenizer::Message;
use edgetune::train::{CancelToken, Choice, Event, Method, Outcome, StopReason, TrainConfig, Trainer};

use crate::fetch::{self, FetchProgress, ModelSource};

/// The settings a user can change: sensible defaults, the rest under "advanced".
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub rank: usize,
    pub alpha: f32,
    /// None: chosen from the data (as every face of the SDK does by default).
    pub learning_rate: Option<f32>,
    /// None: chosen from the data.
    pub epochs: Option<u64>,
    /// None: `epochs` decides.
    pub max_steps: Option<u64>,
    /// Longest sample in tokens.
    pub max_len: usize,
    /// Every linear layer, or only the attention's q and v projections.
    pub all_linear: bool,
    pub gradient_checkpointing: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rank: 16,
            alpha: 32.0,
            learning_rate: None,
            epochs: None,
            max_steps: None,
            max_len: 256,
            all_linear: true,
            gradient_checkpointing: true,
        }
    }
}

impl Settings {
    /// The training configuration these settings make, checked.
    pub fn train_config(&self) -> Result<TrainConfig, String> {
        let mut c = TrainConfig::default();
        c.lora.r = self.rank;
        c.lora.alpha = self.alpha;
        c.lora.target_modules = if self.all_linear {
            TargetModules::Preset("all-linear".into())
        } else {
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
        };
        c.learning_rate = self.learning_rate;
        c.epochs = self.epochs;
        c.max_steps = self.max_steps;
        c.data.max_len = self.max_len;
        c.gradient_checkpointing = self.gradient_checkpointing;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// Where training stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Idle,
    Running,
    Paused,
    /// Ended: "completed", "early stopped" or "cancelled".
    Finished(String),
    Failed(String),
}

impl Phase {
    pub fn is_active(&self) -> bool {
        matches!(self, Phase::Running | Phase::Paused)
    }
}

/// The model as loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub architecture: String,
    pub layers: usize,
    pub parameters: usize,
    /// Bytes of the weights on the GPU (NF4 linear layers, f16 tables).
    pub weight_bytes: u64,
    pub max_context: usize,
}

/// The dataset as loaded: its counts and how a few samples render.
#[derive(Debug, Clone)]
pub struct DataInfo {
    pub path: PathBuf,
    pub report: DataReport,
    /// The first samples as the chat template renders them.
    pub previews: Vec<String>,
}

/// The numbers the plot and the status line show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// (step, training loss, learning rate)
    pub steps: Vec<(u64, f32, f32)>,
    /// (step, validation loss)
    pub evals: Vec<(u64, f32)>,
    /// (step, reward margin, reward accuracy) of a run on preference pairs (DPO): how much more
    /// the adapter prefers the chosen answers than the base does.
    pub margins: Vec<(u64, f32, f32)>,
    pub total_steps: u64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
    pub gpu_memory_bytes: u64,
    pub warnings: Vec<String>,
}

impl Progress {
    pub fn apply(&mut self, e: &Event) {
        match e {
            Event::Started { total_steps, planned_gpu_bytes, .. } => {
                self.total_steps = *total_steps;
                self.gpu_memory_bytes = *planned_gpu_bytes;
            }
            Event::Step { step, total_steps, loss, lr, tokens_per_s, eta_s, gpu_memory_bytes, rewards, .. } => {
                self.steps.push((*step, *loss, *lr));
                if let Some(r) = rewards {
                    self.margins.push((*step, r.margins, r.accuracies));
                }
                self.total_steps = *total_steps;
                (self.tokens_per_s, self.eta_s, self.gpu_memory_bytes) = (*tokens_per_s, *eta_s, *gpu_memory_bytes);
            }
            Event::Eval { step, val_loss, .. } => self.evals.push((*step, *val_loss)),
            Event::Warning { step, message } => self.warnings.push(format!("step {step}: {message}")),
            Event::Checkpoint { .. } | Event::Finished { .. } => {}
        }
    }

    pub fn last_step(&self) -> u64 {
        self.steps.last().map_or(0, |s| s.0)
    }
}

/// The chat panel: one prompt, answered by the base model and by the personalized one.
#[derive(Debug, Clone, Default)]
pub struct Chat {
    pub prompt: String,
    /// The prompt the answers below answer (the field may have changed since).
    pub asked: String,
    pub base: String,
    pub tuned: String,
    pub busy: bool,
    /// The answer the user wanted instead, as typed.
    pub wanted: String,
}

/// One judgement from the chat panel: a preference pair for DPO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl Feedback {
    /// The pair as a preference record in TRL's conversational format.
    pub fn record(&self) -> String {
        let turn = |role: &str, text: &str| serde_json::json!([{ "role": role, "content": text }]);
        serde_json::json!({
            "prompt": turn("user", &self.prompt),
            "chosen": turn("assistant", &self.chosen),
            "rejected": turn("assistant", &self.rejected),
        })
        .to_string()
    }
}

/// The path fields a file dialog can fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathField {
    /// A GGUF file.
    ModelFile,
    /// A Hugging Face folder.
    ModelFolder,
    /// A JSONL (or JSON, text or Markdown) file.
    DataFile,
    /// A folder of notes.
    DataFolder,
    /// A PEFT adapter folder, to save into or to load.
    AdapterFolder,
}

impl PathField {
    fn is_folder(self) -> bool {
        matches!(self, PathField::ModelFolder | PathField::DataFolder | PathField::AdapterFolder)
    }

    /// The dialog's title.
    fn title(self) -> &'static str {
        match self {
            PathField::ModelFile => "Choose a GGUF model",
            PathField::ModelFolder => "Choose a Hugging Face model folder",
            PathField::DataFile => "Choose a JSONL file of chats",
            PathField::DataFolder => "Choose a folder of your notes",
            PathField::AdapterFolder => "Choose an adapter folder",
        }
    }

    /// The file types the dialog offers, for file fields.
    fn filter(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            PathField::ModelFile => Some(("GGUF model", &["gguf"])),
            PathField::DataFile => Some(("Data", &["jsonl", "json", "txt", "md"])),
            _ => None,
        }
    }
}

/// What the workers send back.
#[derive(Debug)]
pub enum Msg {
    Gpu(Result<Arc<GpuContext>, String>),
    Fetch(FetchProgress),
    Fetched(Result<PathBuf, String>),
    Picked(PathField, Option<PathBuf>),
    Model(Result<Box<(Session, ModelInfo)>, String>),
    Data(Result<(Arc<Dataset>, DataInfo), String>),
    Train(Event),
    TrainEnded(Result<Outcome, String>),
    /// The held-out answers scored after a run (`None`: the held-out records have no answers).
    Scored(Result<Option<AnswerReport>, String>),
    Piece {
        tuned: bool,
        text: String,
    },
    ChatEnded(Result<(), String>),
}

/// Pause and cancel, shared with the training thread.
#[derive(Debug, Default)]
struct Control {
    paused: Mutex<bool>,
    wake: Condvar,
    cancel: CancelToken,
}

impl Control {
    /// Called by the trainer between steps: waits while paused (and not cancelled).
    fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        while *paused && !self.cancel.is_cancelled() {
            paused = self.wake.wait_timeout(paused, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn set_paused(&self, on: bool) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = on;
        self.wake.notify_all();
    }
}

pub struct AppState {
    pub gpu: Option<AdapterReport>,
    /// The GPU's memory, read again after each load and each training run.
    pub memory: Option<GpuMemory>,
    /// Where the default model comes from, and the cache it goes to.
    pub model_source: ModelSource,
    /// How far the default model's fetch has come; `Some` while it runs.
    pub fetch: Option<FetchProgress>,
    /// Whether a file dialog is open.
    pub picking: bool,
    pub model_path: String,
    pub data_path: String,
    pub adapter_path: String,
    pub settings: Settings,
    pub model: Option<ModelInfo>,
    pub data: Option<DataInfo>,
    pub phase: Phase,
    pub progress: Progress,
    /// The personalized adapter: trained here or loaded from a folder.
    pub adapter: Option<(Adapter, String)>,
    pub chat: Chat,
    /// The preference pairs collected in the chat panel, for "Train on my feedback".
    pub feedback: Vec<Feedback>,
    /// Whether the run under way (or the last one) trains on the feedback.
    pub training_feedback: bool,
    /// The validation records answered by the base model and by the adapter the last run
    /// returned, and scored against their own answers.
    pub scores: Option<AnswerReport>,
    /// What a worker is doing now ("loading the model"), if anything besides training.
    pub busy: Option<String>,
    /// The last error, for the banner (cleared by the next action).
    pub error: Option<String>,
    /// The last thing that went well, for the status line.
    pub notice: Option<String>,
    /// The settings the GPU memory estimate was made for, and the estimate.
    estimate: Option<(Settings, Result<u64, String>)>,
    /// The settings chosen from the data for the settings the estimate was made for.
    pub chosen: Vec<Choice>,
    ctx: Option<Arc<GpuContext>>,
    fetch_cancel: Arc<AtomicBool>,
    session: Option<Arc<Mutex<Session>>>,
    dataset: Option<Arc<Dataset>>,
    control: Arc<Control>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    repaint: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("phase", &self.phase).field("busy", &self.busy).finish_non_exhaustive()
    }
}

impl AppState {
    /// A new state; `repaint` is called from worker threads when they have news.
    pub fn new(repaint: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (tx, rx) = channel();
        let model_source = ModelSource::default_model();
        AppState {
            gpu: None,
            memory: None,
            model_path: if model_source.is_cached() {
                model_source.model_path().display().to_string()
            } else {
                String::new()
            },
            model_source,
            fetch: None,
            picking: false,
            data_path: String::new(),
            adapter_path: String::new(),
            settings: Settings::default(),
            model: None,
            data: None,
            phase: Phase::Idle,
            progress: Progress::default(),
            adapter: None,
            chat: Chat { prompt: "Who are you?".into(), ..Default::default() },
            feedback: Vec::new(),
            training_feedback: false,
            scores: None,
            busy: None,
            error: None,
            notice: None,
            estimate: None,
            chosen: Vec::new(),
            ctx: None,
            fetch_cancel: Arc::new(AtomicBool::new(false)),
            session: None,
            dataset: None,
            control: Arc::new(Control::default()),
            tx,
            rx,
            repaint,
        }
    }

    /// Runs `work` on a worker thread and sends its message back.
    fn spawn(&self, work: impl FnOnce(&Sender<Msg>) -> Msg + Send + 'static) {
        let (tx, repaint) = (self.tx.clone(), self.repaint.clone());
        std::thread::spawn(move || {
            let msg = work(&tx);
            let _ = tx.send(msg);
            repaint();
        });
    }

    /// Opens the GPU (once, at start).
    pub fn open_gpu(&mut self) {
        self.busy = Some("opening the GPU".into());
        self.spawn(|_| Msg::Gpu(GpuContext::new(&GpuOptions::default()).map(Arc::new).map_err(|e| e.to_string())));
    }

    /// Whether the default model can be fetched now (it may already be in the cache).
    pub fn can_fetch(&self) -> bool {
        self.busy.is_none() && !self.phase.is_active() && !self.chat.busy
    }

    /// Downloads the default model (unless it is cached), then loads it.
    pub fn fetch_default_model(&mut self) {
        if !self.can_fetch() {
            return;
        }
        self.start("fetching the default model");
        self.fetch = Some(FetchProgress { stage: fetch::Stage::Locating, done: 0, total: None });
        self.fetch_cancel = Arc::new(AtomicBool::new(false));
        let (source, cancel, repaint) = (self.model_source.clone(), self.fetch_cancel.clone(), self.repaint.clone());
        self.spawn(move |tx| {
            let mut last = None;
            let result = fetch::fetch(&source, &cancel, |p| {
                // A message per percent (and per stage) is plenty for a progress bar.
                let at = (p.stage, p.fraction().map(|f| (f * 100.0) as u32));
                if last != Some(at) {
                    last = Some(at);
                    let _ = tx.send(Msg::Fetch(p));
                    repaint();
                }
            });
            Msg::Fetched(result)
        });
    }

    /// Stops the default model's download; nothing half-fetched is kept.
    pub fn cancel_fetch(&mut self) {
        self.fetch_cancel.store(true, Ordering::Relaxed);
    }

    /// The text field a dialog for `field` reads its start from and fills.
    fn path_of(&mut self, field: PathField) -> &mut String {
        match field {
            PathField::ModelFile | PathField::ModelFolder => &mut self.model_path,
            PathField::DataFile | PathField::DataFolder => &mut self.data_path,
            PathField::AdapterFolder => &mut self.adapter_path,
        }
    }

    /// Reads the GPU's memory again (after a load, a training run, or for an estimate).
    fn refresh_memory(&mut self) {
        self.memory = self.ctx.as_ref().and_then(|c| c.memory());
    }

    /// Opens a file dialog for `field`; the choice fills the field.
    pub fn pick(&mut self, field: PathField) {
        if self.picking {
            return;
        }
        if let Some(why) = no_file_dialog() {
            return self.fail(why);
        }
        self.picking = true;
        let current = PathBuf::from(self.path_of(field).trim());
        let start = if current.is_dir() { Some(current) } else { current.parent().map(Path::to_path_buf) };
        self.spawn(move |_| {
            let mut dialog = rfd::AsyncFileDialog::new().set_title(field.title());
            if let Some(dir) = start.filter(|d| d.is_dir()) {
                dialog = dialog.set_directory(dir);
            }
            if let Some((name, extensions)) = field.filter() {
                dialog = dialog.add_filter(name, extensions);
            }
            let chosen = if field.is_folder() {
                pollster::block_on(dialog.pick_folder())
            } else {
                pollster::block_on(dialog.pick_file())
            };
            Msg::Picked(field, chosen.map(|h| h.path().to_path_buf()))
        });
    }

    pub fn can_load_model(&self) -> bool {
        self.ctx.is_some() && self.busy.is_none() && !self.phase.is_active() && !self.chat.busy
    }

    pub fn load_model(&mut self) {
        let Some(ctx) = self.ctx.clone().filter(|_| self.can_load_model()) else { return };
        let path = PathBuf::from(self.model_path.trim());
        self.start("loading the model");
        let max_context = self.settings.max_len.max(1024);
        self.spawn(move |_| {
            let load = LoadOptions { max_context, ..Default::default() };
            Msg::Model(
                Session::open_with(ctx, &path, &load)
                    .map(|s| {
                        let c = &s.model.config;
                        let info = ModelInfo {
                            path: path.clone(),
                            architecture: c.arch.name().to_string(),
                            layers: c.num_layers,
                            parameters: c.parameter_count(),
                            weight_bytes: s.model.weight_bytes,
                            max_context: s.model.max_context,
                        };
                        Box::new((s, info))
                    })
                    .map_err(|e| e.to_string()),
            )
        });
    }

    pub fn can_load_data(&self) -> bool {
        self.session.is_some() && self.busy.is_none() && !self.phase.is_active()
    }

    pub fn load_data(&mut self) {
        let Some(session) = self.session.clone().filter(|_| self.can_load_data()) else { return };
        let cfg = match self.settings.train_config() {
            Ok(c) => c,
            Err(e) => return self.fail(format!("settings: {e}")),
        };
        let path = PathBuf::from(self.data_path.trim());
        self.start("reading the data");
        self.spawn(move |_| {
            let s = session.lock().unwrap_or_else(|p| p.into_inner());
            let loaded = data::load(&path, &s.tokenizer, &cfg.data).and_then(|d| {
                let previews =
                    d.train.iter().take(3).map(|x| s.tokenizer.decode(&x.ids)).collect::<edgetune::Result<Vec<_>>>()?;
                let info = DataInfo { path: path.clone(), report: d.report.clone(), previews };
                Ok((Arc::new(d), info))
            });
            Msg::Data(loaded.map_err(|e| e.to_string()))
        });
    }

    /// GPU bytes training would need with these settings: the weights, the adapter with its
    /// gradients and AdamW moments, and the workspace of the longest sample. An error says why
    /// the settings cannot work: they are invalid, or they do not fit in the GPU's memory.
    /// Planning allocates that workspace, so it is done once per settings and dataset, never
    /// while training.
    pub fn estimate_bytes(&mut self) -> Option<Result<u64, String>> {
        let session = self.session.as_ref()?;
        let dataset = self.dataset.as_ref()?;
        let fresh = self.estimate.as_ref().is_some_and(|(s, _)| *s == self.settings);
        if !fresh && !self.phase.is_active() && !self.chat.busy {
            let weights = self.model.as_ref().map_or(0, |m| m.weight_bytes);
            let planned = self.settings.train_config().and_then(|cfg| {
                let model = session.lock().unwrap_or_else(|p| p.into_inner()).model.clone();
                Trainer::new(model, dataset, cfg)
                    .map(|t| (t.planned_gpu_bytes(), t.chosen().to_vec()))
                    .map_err(|e| e.to_string())
            });
            self.chosen = planned.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
            let planned = planned.map(|(b, _)| b);
            self.refresh_memory();
            let checked = planned.and_then(|b| check_fit(b, weights, self.memory));
            self.estimate = Some((self.settings.clone(), checked));
        }
        self.estimate.as_ref().map(|(_, e)| e.clone())
    }

    /// Whether Train can start: the data is loaded, nothing else runs, and the settings were
    /// not refused (see [`AppState::estimate_bytes`]).
    pub fn can_train(&self) -> bool {
        let refused = matches!(&self.estimate, Some((s, Err(_))) if *s == self.settings);
        self.dataset.is_some() && self.busy.is_none() && !self.phase.is_active() && !self.chat.busy && !refused
    }

    pub fn start_training(&mut self) {
        let (Some(session), Some(dataset)) = (self.session.clone(), self.dataset.clone()) else { return };
        if !self.can_train() {
            return;
        }
        let cfg = match self.settings.train_config() {
            Ok(c) => c,
            Err(e) => return self.fail(format!("settings: {e}")),
        };
        if let Some(Err(e)) = self.estimate_bytes() {
            return self.fail(format!("these settings will not work: {e}"));
        }
        self.training_feedback = false;
        self.run_training(session, move |_| Ok((dataset, cfg, None)));
    }

    /// Starts a run on a worker thread: `prepare` gives the data, the settings and the adapter
    /// to start from (a fresh one when `None`).
    fn run_training(
        &mut self,
        session: Arc<Mutex<Session>>,
        prepare: impl FnOnce(&Session) -> edgetune::Result<(Arc<Dataset>, TrainConfig, Option<Adapter>)> + Send + 'static,
    ) {
        self.error = None;
        self.notice = None;
        self.progress = Progress::default();
        self.scores = None;
        self.phase = Phase::Running;
        self.control = Arc::new(Control::default());
        let control = self.control.clone();
        let repaint = self.repaint.clone();
        self.spawn(move |tx| {
            let (model, prepared) = {
                let s = session.lock().unwrap_or_else(|p| p.into_inner());
                (s.model.clone(), prepare(&s))
            };
            let run = prepared.and_then(|(dataset, cfg, start)| {
                let mut t = match start {
                    Some(a) => Trainer::with_adapter(model, &dataset, cfg, a)?,
                    None => Trainer::new(model, &dataset, cfg)?,
                };
                t.set_cancel_token(control.cancel.clone());
                t.run(|e| {
                    let _ = tx.send(Msg::Train(e.clone()));
                    repaint();
                    if matches!(e, Event::Step { .. }) {
                        control.wait_while_paused();
                    }
                })
            });
            Msg::TrainEnded(run.map_err(|e| e.to_string()))
        });
    }

    /// Answers the validation records (the part of the data held out of training) with the base
    /// model and with the adapter just trained, and scores each answer against the record's own
    /// (exact match, token F1, ROUGE-L), so the user sees what training changed in the answers.
    /// Records without an answer to compare (notes as plain text) are left out.
    fn score_held_out(&mut self) {
        let (Some(session), Some(dataset), Some((adapter, _)), Some(info)) =
            (self.session.clone(), &self.dataset, &self.adapter, &self.data)
        else {
            return;
        };
        let held: std::collections::HashSet<(PathBuf, usize)> =
            dataset.val.iter().map(|x| (x.file.clone(), x.line)).collect();
        if held.is_empty() {
            return;
        }
        let (adapter, path) = (adapter.clone(), info.path.clone());
        let system = self.settings.train_config().ok().and_then(|c| c.data.system);
        self.start("scoring the held-out answers");
        self.spawn(move |_| {
            let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
            let mut score = || -> edgetune::Result<Option<AnswerReport>> {
                let (records, _) = data::formats::read(&path, Format::Auto, &mut 0)?;
                let answered = |r: &Sourced| {
                    matches!(r.record, Record::Chat(_) | Record::Preference(Preference::Chat { .. }))
                        && held.contains(&(r.file.clone(), r.line))
                };
                let records: Vec<Sourced> = records.into_iter().filter(answered).collect();
                if records.is_empty() {
                    return Ok(None);
                }
                s.set_adapter(Some(&adapter))?;
                let opts = GenerateOptions { max_new_tokens: 48, ..Default::default() };
                let report = s.score_answers(&records, system.as_deref(), &opts, |_, _| {});
                s.set_adapter(None)?;
                report.map(Some)
            };
            Msg::Scored(score().map_err(|e| e.to_string()))
        });
    }

    /// The two answers shown (the personalized one comes only with an adapter) are both there
    /// and differ, so one can be preferred.
    pub fn can_prefer(&self) -> bool {
        !self.chat.busy
            && !self.chat.base.trim().is_empty()
            && !self.chat.tuned.trim().is_empty()
            && self.chat.base.trim() != self.chat.tuned.trim()
    }

    /// Records that the personalized answer (`tuned`) or the base's is the better one.
    pub fn prefer(&mut self, tuned: bool) {
        if !self.can_prefer() {
            return;
        }
        let (base, personal) = (self.chat.base.trim().to_string(), self.chat.tuned.trim().to_string());
        let (chosen, rejected) = if tuned { (personal, base) } else { (base, personal) };
        self.add_feedback(chosen, vec![rejected]);
    }

    /// Whether the typed answer can be recorded: there are answers to prefer it to.
    pub fn can_add_wanted(&self) -> bool {
        !self.chat.busy && !self.chat.wanted.trim().is_empty() && !self.chat.base.trim().is_empty()
    }

    /// Records the typed answer as better than each answer shown.
    pub fn add_wanted(&mut self) {
        if !self.can_add_wanted() {
            return;
        }
        let wanted = self.chat.wanted.trim().to_string();
        let shown = [&self.chat.base, &self.chat.tuned].map(|a| a.trim().to_string());
        let rejected: Vec<String> = shown.into_iter().filter(|a| !a.is_empty()).collect();
        if self.add_feedback(wanted, rejected) > 0 {
            self.chat.wanted.clear();
        }
    }

    /// Adds a pair per rejected answer (not one equal to the chosen one, nor one already
    /// there), and says how many there are; returns how many were added.
    fn add_feedback(&mut self, chosen: String, rejected: Vec<String>) -> usize {
        let prompt = self.chat.asked.clone();
        let mut added = 0;
        for r in rejected {
            let pair = Feedback { prompt: prompt.clone(), chosen: chosen.clone(), rejected: r };
            if pair.chosen != pair.rejected && !self.feedback.contains(&pair) {
                self.feedback.push(pair);
                added += 1;
            }
        }
        if added == 0 {
            self.fail("that answer is the same as the one it would be preferred to, or already recorded".into());
        } else {
            self.done(format!("{} feedback pairs", self.feedback.len()));
        }
        added
    }

    /// Whether "Train on my feedback" can start.
    pub fn can_train_feedback(&self) -> bool {
        self.session.is_some()
            && !self.feedback.is_empty()
            && self.busy.is_none()
            && !self.phase.is_active()
            && !self.chat.busy
    }

    /// Trains DPO on the feedback pairs, starting from the personalized adapter when there is
    /// one (its answers are then the reference the feedback moves away from) and from a fresh
    /// one otherwise. The settings are the panel's, with DPO's own defaults.
    pub fn train_on_feedback(&mut self) {
        let Some(session) = self.session.clone().filter(|_| self.can_train_feedback()) else { return };
        let mut cfg = match self.settings.train_config() {
            Ok(c) => c,
            Err(e) => return self.fail(format!("settings: {e}")),
        };
        cfg.method = Method::Dpo;
        // Trainer::with_adapter takes the adapter's own rank, alpha and modules.
        let start = self.adapter.as_ref().map(|(a, _)| a.clone());
        let records: Vec<String> = self.feedback.iter().map(Feedback::record).collect();
        self.training_feedback = true;
        self.run_training(session, move |s| {
            let source = Source::Records { name: "feedback".into(), records };
            let dataset = data::load_sources(&[source], &s.tokenizer, &cfg.data)?;
            Ok((Arc::new(dataset), cfg, start))
        });
    }

    pub fn pause(&mut self) {
        if self.phase == Phase::Running {
            self.control.set_paused(true);
            self.phase = Phase::Paused;
        }
    }

    pub fn resume(&mut self) {
        if self.phase == Phase::Paused {
            self.control.set_paused(false);
            self.phase = Phase::Running;
        }
    }

    pub fn cancel(&mut self) {
        if self.phase.is_active() {
            self.control.cancel.cancel();
            self.control.set_paused(false);
        }
    }

    pub fn can_chat(&self) -> bool {
        self.session.is_some() && !self.chat.busy && !self.phase.is_active() && self.busy.is_none()
    }

    /// Answers the prompt with the base model, then (if there is one) with the adapter, token
    /// by token.
    pub fn ask(&mut self) {
        let Some(session) = self.session.clone().filter(|_| self.can_chat()) else { return };
        let prompt = self.chat.prompt.trim().to_string();
        if prompt.is_empty() {
            return self.fail("type a question first".into());
        }
        self.error = None;
        self.chat.base.clear();
        self.chat.tuned.clear();
        self.chat.asked = prompt.clone();
        self.chat.busy = true;
        let adapter = self.adapter.as_ref().map(|a| a.0.clone());
        let repaint = self.repaint.clone();
        self.spawn(move |tx| {
            let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
            let opts = GenerateOptions { max_new_tokens: 96, ..Default::default() };
            let messages = [Message::new("user", prompt)];
            let answer = |s: &mut Session, adapter: Option<&Adapter>, tuned: bool| -> edgetune::Result<()> {
                s.set_adapter(adapter)?;
                s.chat(&messages, &opts, |piece| {
                    let _ = tx.send(Msg::Piece { tuned, text: piece.to_string() });
                    repaint();
                    true
                })?;
                Ok(())
            };
            let mut result = answer(&mut s, None, false);
            if let (Ok(()), Some(a)) = (&result, &adapter) {
                result = answer(&mut s, Some(a), true);
            }
            Msg::ChatEnded(result.map_err(|e| e.to_string()))
        });
    }

    /// Saves the adapter as a PEFT folder.
    pub fn save_adapter(&mut self) {
        let (Some((adapter, _)), Some(model)) = (&self.adapter, &self.model) else { return };
        let dir = PathBuf::from(self.adapter_path.trim());
        if dir.as_os_str().is_empty() {
            return self.fail("choose a folder to save the adapter in".into());
        }
        let base = model.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match peft::save(&dir, adapter, &base) {
            Ok(()) => self.done(format!("adapter saved to {} (a PEFT folder)", dir.display())),
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// Loads an earlier adapter (a PEFT folder) to compare with.
    pub fn load_adapter(&mut self) {
        let Some(session) = &self.session else { return };
        let dir = PathBuf::from(self.adapter_path.trim());
        let config = session.lock().unwrap_or_else(|p| p.into_inner()).model.config.clone();
        match edgetune::lora::load(&dir, &config) {
            Ok(a) => {
                self.adapter = Some((a, format!("loaded from {}", dir.display())));
                self.done(format!("adapter loaded from {}", dir.display()));
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn start(&mut self, what: &str) {
        self.busy = Some(what.into());
        self.error = None;
        self.notice = None;
    }

    fn fail(&mut self, message: String) {
        self.error = Some(message);
    }

    fn done(&mut self, message: String) {
        self.error = None;
        self.notice = Some(message);
    }

    /// Applies what the workers have sent; the UI calls this every frame.
    pub fn poll(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.apply(msg);
        }
    }

    pub fn apply(&mut self, msg: Msg) {
        match msg {
            Msg::Gpu(r) => {
                self.busy = None;
                match r {
                    Ok(ctx) => {
                        self.gpu = Some(ctx.report.clone());
                        self.memory = ctx.memory();
                        self.ctx = Some(ctx);
                    }
                    Err(e) => self.fail(e),
                }
            }
            Msg::Fetch(p) => self.fetch = Some(p),
            Msg::Fetched(r) => {
                self.busy = None;
                self.fetch = None;
                match r {
                    Ok(path) => {
                        self.model_path = path.display().to_string();
                        self.load_model();
                    }
                    Err(e) => self.fail(format!("fetching the default model: {e}")),
                }
            }
            Msg::Picked(field, path) => {
                self.picking = false;
                if let Some(p) = path {
                    let p = p.display().to_string();
                    *self.path_of(field) = p;
                }
            }
            Msg::Model(r) => {
                self.busy = None;
                match r.map(|b| *b) {
                    Ok((session, info)) => {
                        self.done(format!("loaded {}", info.path.display()));
                        self.session = Some(Arc::new(Mutex::new(session)));
                        self.model = Some(info);
                        self.refresh_memory();
                        // Data, adapters and answers belonged to the model before.
                        (self.data, self.dataset, self.adapter, self.estimate) = (None, None, None, None);
                        self.chat = Chat { prompt: std::mem::take(&mut self.chat.prompt), ..Default::default() };
                        self.progress = Progress::default();
                        self.phase = Phase::Idle;
                    }
                    Err(e) => self.fail(e),
                }
            }
            Msg::Data(r) => {
                self.busy = None;
                match r {
                    Ok((dataset, info)) => {
                        self.done(format!(
                            "{} training and {} validation samples",
                            info.report.train_samples, info.report.val_samples
                        ));
                        self.dataset = Some(dataset);
                        self.data = Some(info);
                        self.estimate = None;
                    }
                    Err(e) => self.fail(e),
                }
            }
            Msg::Train(e) => self.progress.apply(&e),
            Msg::TrainEnded(r) => match r {
                Ok(out) => {
                    let reason = match out.reason {
                        StopReason::Completed => "completed",
                        StopReason::EarlyStopped => "early stopped",
                        StopReason::Cancelled => "cancelled",
                    };
                    self.phase = Phase::Finished(reason.into());
                    let label = if self.training_feedback {
                        format!("trained on {} feedback pairs ({} steps, {reason})", self.feedback.len(), out.steps)
                    } else {
                        format!("trained here ({} steps, {reason})", out.steps)
                    };
                    self.adapter = Some((out.adapter, label));
                    self.refresh_memory();
                    self.done(format!("training {reason}"));
                    if !self.training_feedback {
                        self.score_held_out();
                    }
                }
                Err(e) => {
                    self.phase = Phase::Failed(e.clone());
                    self.fail(e);
                }
            },
            Msg::Scored(r) => {
                self.busy = None;
                match r {
                    Ok(report) => self.scores = report,
                    Err(e) => self.fail(format!("scoring the held-out answers: {e}")),
                }
            }
            Msg::Piece { tuned, text } => {
                if tuned { &mut self.chat.tuned } else { &mut self.chat.base }.push_str(&text);
            }
            Msg::ChatEnded(r) => {
                self.chat.busy = false;
                if let Err(e) = r {
                    self.fail(e);
                }
            }
        }
    }

    /// Whether a worker is still busy (for tests and the repaint loop).
    pub fn working(&self) -> bool {
        self.busy.is_some() || self.phase.is_active() || self.chat.busy
    }

    /// The model's folder or file name, for labels.
    pub fn model_name(&self) -> String {
        self.model.as_ref().map(|m| name_of(&m.path)).unwrap_or_default()
    }
}

/// Why no file dialog can open, where that is known beforehand: on Linux and the BSDs the
/// dialog is the desktop portal (over the session's D-Bus) or else zenity, and with neither a
/// click would do nothing.
fn no_file_dialog() -> Option<String> {
    if !cfg!(any(target_os = "linux", target_os = "freebsd", target_os = "openbsd", target_os = "netbsd")) {
        return None;
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let bus = env("DBUS_SESSION_BUS_ADDRESS").is_some()
        || env("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).join("bus").exists());
    let zenity = env("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("zenity").is_file()));
    (!bus && !zenity).then(|| {
        "no file dialog here: there is no desktop session bus for the portal, and no zenity; type the path instead"
            .to_string()
    })
}

/// Whether training that plans `planned` GPU bytes fits, when the model's `weights` are already
/// there: against the GPU's free memory where the driver reports a budget, else its whole heap.
/// Where the GPU's memory is unknown, nothing is refused.
pub fn check_fit(planned: u64, weights: u64, memory: Option<GpuMemory>) -> Result<u64, String> {
    let Some(m) = memory else { return Ok(planned) };
    m.check_fits(planned.saturating_sub(weights), weights.min(planned))
        .map(|()| planned)
        .map_err(|e| format!("training {e}; try a shorter sequence length, a lower rank, or gradient checkpointing"))
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Bytes for people: "1.4 GiB", "312.5 MiB".
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        AppState::new(Arc::new(|| {}))
    }

    #[test]
    fn settings_make_a_checked_train_config() {
        let c = Settings::default().train_config().expect("defaults are valid");
        // The data-dependent settings are left to the SDK's automatic rule, as in every face.
        assert_eq!((c.lora.r, c.lora.alpha, c.data.max_len), (16, 32.0, 256));
        assert_eq!((c.epochs, c.max_steps, c.learning_rate, c.batch_tokens), (None, None, None, None));
        let set = Settings { epochs: Some(5), learning_rate: Some(1e-3), ..Default::default() }.train_config();
        assert_eq!(set.map(|c| (c.epochs, c.learning_rate)), Ok((Some(5), Some(1e-3))));
        let qv = Settings { all_linear: false, ..Default::default() }.train_config().expect("valid");
        assert_eq!(qv.lora.target_modules, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        let bad = Settings { learning_rate: Some(-1.0), ..Default::default() }.train_config();
        assert!(bad.is_err_and(|e| e.contains("learning_rate")));
        assert!(Settings { rank: 0, ..Default::default() }.train_config().is_err());
    }

    #[test]
    fn progress_follows_the_trainer_events() {
        let mut p = Progress::default();
        p.apply(&Event::Started {
            total_steps: 4,
            start_step: 0,
            train_samples: 3,
            val_samples: 1,
            batches_per_epoch: 3,
            trainable_parameters: 10,
            planned_gpu_bytes: 100,
            chosen: Vec::new(),
        });
        assert_eq!((p.total_steps, p.gpu_memory_bytes), (4, 100));
        for step in 1..=2 {
            p.apply(&Event::Step {
                step,
                total_steps: 4,
                epoch: 0.5,
                loss: 3.0 - step as f32,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 10,
                tokens_per_s: 50.0,
                eta_s: 2.0,
                gpu_memory_bytes: 120,
                rewards: None,
            });
        }
        p.apply(&Event::Eval {
            step: 2,
            val_loss: 1.5,
            perplexity: 4.5,
            best_val_loss: 1.5,
            improved: true,
            rewards: None,
            answers: None,
        });
        p.apply(&Event::Warning { step: 2, message: "skipped".into() });
        assert_eq!(p.steps, vec![(1, 2.0, 1e-3), (2, 1.0, 1e-3)]);
        assert_eq!(p.evals, vec![(2, 1.5)]);
        assert_eq!((p.last_step(), p.gpu_memory_bytes, p.tokens_per_s), (2, 120, 50.0));
        assert_eq!(p.warnings, ["step 2: skipped"]);
    }

    #[test]
    fn nothing_starts_before_its_inputs_are_there() {
        let mut s = state();
        assert!(!s.can_load_model() && !s.can_load_data() && !s.can_train() && !s.can_chat());
        s.load_model();
        s.load_data();
        s.start_training();
        s.ask();
        assert_eq!(s.phase, Phase::Idle);
        assert!(!s.working());
    }

    #[test]
    fn pause_resume_and_cancel_move_the_phase() {
        let mut s = state();
        s.phase = Phase::Running;
        s.pause();
        assert_eq!(s.phase, Phase::Paused);
        assert!(*s.control.paused.lock().expect("lock"));
        // The training thread waits while paused, and wakes when resumed.
        let control = s.control.clone();
        let waiter = std::thread::spawn(move || control.wait_while_paused());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        s.resume();
        waiter.join().expect("woke");
        assert_eq!(s.phase, Phase::Running);
        // Cancel while paused wakes the trainer too.
        s.pause();
        s.cancel();
        assert!(s.control.cancel.is_cancelled());
        s.control.wait_while_paused();
        s.apply(Msg::TrainEnded(Err("boom".into())));
        assert_eq!(s.phase, Phase::Failed("boom".into()));
        assert_eq!(s.error.as_deref(), Some("boom"));
        s.resume();
        assert_eq!(s.phase, Phase::Failed("boom".into()), "resume does nothing unless paused");
    }

    #[test]
    fn errors_from_workers_land_in_the_banner_and_clear_the_busy_flag() {
        let mut s = state();
        s.busy = Some("loading the model".into());
        s.apply(Msg::Model(Err("model.gguf: not a GGUF file".into())));
        assert_eq!(s.busy, None);
        assert_eq!(s.error.as_deref(), Some("model.gguf: not a GGUF file"));
        s.chat.busy = true;
        s.apply(Msg::Piece { tuned: false, text: "Hel".into() });
        s.apply(Msg::Piece { tuned: false, text: "lo".into() });
        s.apply(Msg::Piece { tuned: true, text: "Ahoy".into() });
        s.apply(Msg::ChatEnded(Ok(())));
        assert_eq!((s.chat.base.as_str(), s.chat.tuned.as_str(), s.chat.busy), ("Hello", "Ahoy", false));
    }

    #[test]
    fn settings_that_do_not_fit_are_refused_with_the_reason() {
        const GIB: u64 = 1 << 30;
        let heap = |free| Some(GpuMemory { total_bytes: 4 * GIB, available_bytes: free });
        assert_eq!(check_fit(3 * GIB, GIB, None), Ok(3 * GIB), "unknown memory refuses nothing");
        assert_eq!(check_fit(4 * GIB, GIB, heap(None)), Ok(4 * GIB));
        let e = check_fit(4 * GIB + 1, GIB, heap(None)).expect_err("over the heap");
        assert!(e.contains("the GPU has 4.00 GiB") && e.contains("shorter sequence length"), "{e}");
        // With a budget, the weights already loaded are not counted twice.
        assert_eq!(check_fit(3 * GIB, GIB, heap(Some(2 * GIB))), Ok(3 * GIB));
        let e = check_fit(3 * GIB + 1, GIB, heap(Some(2 * GIB))).expect_err("over the budget");
        assert!(e.contains("2.00 GiB of 4.00 GiB is free"), "{e}");
    }

    #[test]
    fn dialogs_fill_their_field_and_a_dismissed_one_changes_nothing() {
        let mut s = state();
        s.picking = true;
        s.apply(Msg::Picked(PathField::ModelFolder, Some(PathBuf::from("/m/SmolLM2"))));
        s.apply(Msg::Picked(PathField::DataFile, Some(PathBuf::from("/d/chats.jsonl"))));
        s.apply(Msg::Picked(PathField::AdapterFolder, Some(PathBuf::from("/a/mine"))));
        assert_eq!(
            (s.model_path.as_str(), s.data_path.as_str(), s.adapter_path.as_str()),
            ("/m/SmolLM2", "/d/chats.jsonl", "/a/mine")
        );
        s.picking = true;
        s.apply(Msg::Picked(PathField::DataFolder, None));
        assert_eq!((s.data_path.as_str(), s.picking), ("/d/chats.jsonl", false));
        assert!(PathField::DataFolder.is_folder() && !PathField::ModelFile.is_folder());
        assert_eq!(PathField::ModelFile.filter(), Some(("GGUF model", &["gguf"][..])));
    }

    #[test]
    fn a_failed_fetch_says_why_and_frees_the_app() {
        let mut s = state();
        s.model_source.cache = std::env::temp_dir().join("edgetune-demo-no-such-cache");
        s.model_source.index_url = "http://127.0.0.1:9/simple".into();
        s.model_source.allow_http = true;
        s.fetch_default_model();
        assert!(s.fetch.is_some() && s.busy.is_some() && !s.can_fetch());
        while s.fetch.is_some() {
            let msg = s.rx.recv_timeout(Duration::from_secs(60)).expect("the worker answers");
            s.apply(msg);
        }
        assert_eq!((s.fetch, s.busy.as_deref()), (None, None));
        let e = s.error.as_deref().unwrap_or("");
        assert!(e.starts_with("fetching the default model: could not reach") && e.contains("127.0.0.1:9"), "{e}");
        assert!(s.can_fetch());
    }

    #[test]
    fn feedback_makes_preference_pairs_the_sdk_reads() {
        let mut s = state();
        s.chat = Chat { asked: "Who are you?".into(), base: "A model. ".into(), ..Default::default() };
        assert!(!s.can_prefer(), "no adapter: one answer to judge, nothing to prefer it to");
        s.chat.wanted = "Edge.".into();
        s.add_wanted();
        assert_eq!(s.feedback.len(), 1, "the typed answer is better than the one shown");
        s.feedback.clear();
        s.chat.tuned = "Edge.".into();
        s.chat.wanted = "I am Edge, your assistant.".into();
        s.add_wanted();
        let want = |c: &str, r: &str| Feedback { prompt: "Who are you?".into(), chosen: c.into(), rejected: r.into() };
        // Both answers shown are rejected in favour of the one typed, trimmed.
        assert_eq!(
            s.feedback,
            [want("I am Edge, your assistant.", "A model."), want("I am Edge, your assistant.", "Edge.")]
        );
        assert!(s.chat.wanted.is_empty());
        assert!(s.can_prefer());
        s.prefer(true);
        assert_eq!(s.feedback.last(), Some(&want("Edge.", "A model.")));
        // The same judgement twice is one pair; the same answer on both sides is none.
        s.prefer(true);
        assert_eq!(s.feedback.len(), 3);
        assert!(s.error.as_deref().is_some_and(|e| e.contains("already recorded")));
        s.chat.tuned = "A model.".into();
        assert!(!s.can_prefer());
        // The SDK reads the pairs as TRL's conversational preference records.
        // The repository's fixtures: `EDGETUNE_FIXTURES` when set (these tests also run from the
        // crate's unpacked `.crate` file, which has none), else the checkout's.
        let fixtures = std::env::var_os("EDGETUNE_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures"));
        let dir = fixtures.join("tiny_llama");
        let tok = edgetune::tokenizer::Tokenizer::open(&dir).expect("tokenizer");
        let records = s.feedback.iter().map(Feedback::record).collect();
        let cfg = edgetune::data::DataConfig { val_fraction: Some(0.0), ..Default::default() };
        let d = data::load_sources(&[Source::Records { name: "feedback".into(), records }], &tok, &cfg).expect("loads");
        assert_eq!(d.train.len(), 3);
        assert!(d.train.iter().all(|x| x.rejected_at.is_some()), "every sample is a pair");
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
