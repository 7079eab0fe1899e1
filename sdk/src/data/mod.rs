//! The data pipeline: records from files ([`formats`]) → cleaning (exact or normalized dedup,
//! length filters) → the model's chat template → token ids with a loss mask → a seeded
//! train/validation split → packed batches.
//!
//! Loss masking: by default only assistant turns are trained. The template is rendered once for
//! the whole conversation; each assistant turn's byte span is where the rendering of the
//! conversation up to that turn extends the rendering of what precedes it with the generation
//! prompt. Tokens that start inside a span are trained (the turn's end-of-turn token included,
//! so the model learns to stop).
//!
//! Truncation policy: a chat sample longer than `max_len` tokens keeps its first `max_len`
//! tokens (`truncation = "right"`), and is dropped if no trained token survives; with
//! `truncation = "drop"` every over-long chat sample is dropped. Plain text is never truncated:
//! it is cut into consecutive chunks of `max_len` tokens.

pub mod formats;

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::infer::Rng;
use crate::tokenizer::{Message, Tokenizer};
pub use formats::{BadRecord, Format, Record};

/// Which tokens carry the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Assistant turns only (the default).
    #[default]
    Assistant,
    /// Every token but the first.
    All,
}

/// What happens to a chat sample longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first `max_len` tokens.
    #[default]
    Right,
    /// Drop the sample.
    Drop,
}

/// Duplicate removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    None,
    /// Identical records.
    Exact,
    /// Records equal after lower-casing and collapsing whitespace.
    #[default]
    Normalized,
}

/// How a dataset is read and cut into samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub format: Format,
    /// Longest sample in tokens (also the text chunk length).
    pub max_len: usize,
    pub train_on: TrainOn,
    pub truncation: Truncation,
    pub dedup: Dedup,
    /// Samples with fewer tokens are dropped.
    pub min_tokens: usize,
    /// Share of the samples held out for validation (0 for none).
    pub val_fraction: f32,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Skip unreadable records (and count them) instead of failing on the first.
    pub skip_bad_records: bool,
    /// A system message for conversations that have none; without it the chat template's own
    /// default applies (SmolLM2's, for one, is a 20-token introduction). Generate with the same
    /// system message to ask the model as it was trained.
    pub system: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            format: Format::Auto,
            max_len: 512,
            train_on: TrainOn::Assistant,
            truncation: Truncation::Right,
            dedup: Dedup::Normalized,
            min_tokens: 2,
            val_fraction: 0.1,
            seed: 0,
            skip_bad_records: false,
            system: None,
        }
    }
}

impl DataConfig {
    /// Every problem with this configuration.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_len < 2 {
            p.push(format!("max_len must be at least 2 tokens (got {})", self.max_len));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            p.push(format!("val_fraction must be in [0, 1) (got {})", self.val_fraction));
        }
        p
    }
}

/// One tokenized sample: `train[i]` says whether token i is a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
    pub file: PathBuf,
    pub line: usize,
}

impl Sample {
    pub fn n_trained(&self) -> usize {
        self.train.iter().skip(1).filter(|&&t| t).count()
    }
}

/// What happened to the records of a dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataReport {
    pub records: usize,
    pub bad_records: usize,
    pub duplicates: usize,
    pub too_short: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    pub train_tokens: usize,
    pub trained_tokens: usize,
    /// The first few bad records, for display.
    pub bad_examples: Vec<String>,
}

/// A tokenized dataset, split.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub report: DataReport,
}

fn normalize(s: &str, how: Dedup) -> String {
    match how {
        Dedup::Normalized => s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" "),
        _ => s.to_string(),
    }
}

fn record_key(r: &Record, how: Dedup) -> String {
    match r {
        Record::Text(t) => normalize(t, how),
        Record::Chat(m) => {
            m.iter().map(|m| format!("{}\u{1}{}", m.role, normalize(&m.content, how))).collect::<Vec<_>>().join("\u{2}")
        }
    }
}

/// The conversation with `system` put first when it has no system message of its own.
fn with_system<'a>(msgs: &'a [Message], system: Option<&str>) -> Cow<'a, [Message]> {
    match system {
        Some(s) if msgs.first().is_none_or(|m| m.role != "system") => {
            Cow::Owned(std::iter::once(Message::new("system", s)).chain(msgs.iter().cloned()).collect())
        }
        _ => Cow::Borrowed(msgs),
    }
}

/// Token ids and train flags of a conversation rendered with the chat template.
pub fn tokenize_chat(
    tok: &Tokenizer,
    msgs: &[Message],
    train_on: TrainOn,
) -> std::result::Result<(Vec<u32>, Vec<bool>), String> {
    let full = tok.apply_chat_template(msgs, false).map_err(|e| e.to_string())?;
    let (ids, offsets) = tok.encode_with_offsets(&full).map_err(|e| e.to_string())?;
    let mut spans = Vec::new();
    if train_on == TrainOn::Assistant {
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = tok.apply_chat_template(&msgs[..i], true).map_err(|e| e.to_string())?;
            let upto = tok.apply_chat_template(&msgs[..=i], false).map_err(|e| e.to_string())?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err("the chat template does not render conversations prefix by prefix, so assistant \
                            turns cannot be located; set train_on = \"all\""
                    .into());
            }
            spans.push((before.len(), upto.len()));
        }
        if spans.is_empty() {
            return Err(
                "has no assistant turn to train on (train_on = \"assistant\"); add one, or set train_on = \"all\""
                    .into(),
            );
        }
    }
    let train = offsets
        .iter()
        .enumerate()
        .map(|(i, &(start, _))| match train_on {
            TrainOn::All => i > 0,
            TrainOn::Assistant => spans.iter().any(|&(a, b)| start >= a && start < b),
        })
        .collect();
    Ok((ids, train))
}

/// Where training records come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A file or a folder of files.
    Path(PathBuf),
    /// Records held by the caller, each one JSON object in any format a file may hold (or
    /// `{"text": ...}`). Errors name record i as line i (from 1) of `name`.
    Records { name: String, records: Vec<String> },
}

impl Source {
    fn label(&self) -> PathBuf {
        match self {
            Source::Path(p) => p.clone(),
            Source::Records { name, .. } => PathBuf::from(name),
        }
    }
}

/// Reads, cleans, tokenizes and splits a dataset.
pub fn load(path: &Path, tok: &Tokenizer, cfg: &DataConfig) -> Result<Dataset> {
    load_sources(&[Source::Path(path.to_path_buf())], tok, cfg)
}

/// [`load`] over several sources at once: files, folders and records held in memory, cleaned,
/// deduplicated and split together.
pub fn load_sources(sources: &[Source], tok: &Tokenizer, cfg: &DataConfig) -> Result<Dataset> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(Error::invalid("data config", problems.join("; ")));
    }
    if sources.is_empty() {
        return Err(Error::invalid("training data", "no file and no record was given"));
    }
    let (mut records, mut bad) = (Vec::new(), Vec::new());
    for source in sources {
        let (r, b) = match source {
            Source::Path(p) => formats::read(p, cfg.format)?,
            Source::Records { name, records } => formats::read_records(Path::new(name), records, cfg.format),
        };
        records.extend(r);
        bad.extend(b);
    }
    let labels: Vec<String> = sources.iter().map(|s| s.label().display().to_string()).collect();
    let path = PathBuf::from(labels.join(", "));
    let mut report = DataReport { records: records.len() + bad.len(), ..Default::default() };
    let mut seen = HashSet::new();
    let mut samples = Vec::new();
    for r in records {
        if cfg.dedup != Dedup::None && !seen.insert(record_key(&r.record, cfg.dedup)) {
            report.duplicates += 1;
            continue;
        }
        match &r.record {
            Record::Text(text) => {
                let ids =
                    tok.encode_prompt(text).map_err(|e| Error::format(&r.file, format!("line {}: {e}", r.line)))?;
                for chunk in ids.chunks(cfg.max_len) {
                    let train = (0..chunk.len()).map(|i| i > 0).collect();
                    samples.push(Sample { ids: chunk.to_vec(), train, file: r.file.clone(), line: r.line });
                }
            }
            Record::Chat(msgs) => match tokenize_chat(tok, &with_system(msgs, cfg.system.as_deref()), cfg.train_on) {
                Ok((mut ids, mut train)) => {
                    if ids.len() > cfg.max_len {
                        if cfg.truncation == Truncation::Drop {
                            report.dropped_too_long += 1;
                            continue;
                        }
                        ids.truncate(cfg.max_len);
                        train.truncate(cfg.max_len);
                        if !train.iter().skip(1).any(|&t| t) {
                            report.dropped_too_long += 1;
                            continue;
                        }
                        report.truncated += 1;
                    }
                    samples.push(Sample { ids, train, file: r.file.clone(), line: r.line });
                }
                Err(what) => bad.push(BadRecord { file: r.file.clone(), line: r.line, what }),
            },
        }
    }
    report.bad_records = bad.len();
    report.bad_examples = bad.iter().take(5).map(ToString::to_string).collect();
    if let Some(first) = bad.first()
        && !cfg.skip_bad_records
    {
        let more = if bad.len() > 1 { format!(" (and {} more bad records)", bad.len() - 1) } else { String::new() };
        return Err(Error::format(
            &first.file,
            format!("line {}: {}{more}; set skip_bad_records to skip them", first.line, first.what),
        ));
    }
    let before = samples.len();
    samples.retain(|s| s.ids.len() >= cfg.min_tokens.max(2) && s.n_trained() > 0);
    report.too_short = before - samples.len();
    if samples.is_empty() {
        let why = if report.records == 0 {
            "holds no records".to_string()
        } else if report.dropped_too_long > 0
            && report.dropped_too_long + report.bad_records + report.duplicates == report.records
        {
            format!(
                "every sample is longer than max_len = {} tokens and none could be kept; raise max_len",
                cfg.max_len
            )
        } else {
            format!(
                "no usable samples: {} records, {} bad, {} duplicates, {} too short, {} too long",
                report.records, report.bad_records, report.duplicates, report.too_short, report.dropped_too_long
            )
        };
        return Err(Error::format(&path, why));
    }
    // Seeded split.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let mut rng = Rng::new(cfg.seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        order.swap(i, j);
    }
    let n_val = if cfg.val_fraction > 0.0 && samples.len() >= 2 {
        ((samples.len() as f32 * cfg.val_fraction).round() as usize).clamp(1, samples.len() - 1)
    } else {
        0
    };
    let mut slots: Vec<Option<Sample>> = samples.into_iter().map(Some).collect();
    let val: Vec<Sample> = order[..n_val].iter().filter_map(|&i| slots[i].take()).collect();
    let train: Vec<Sample> = order[n_val..].iter().filter_map(|&i| slots[i].take()).collect();
    report.train_samples = train.len();
    report.val_samples = val.len();
    report.train_tokens = train.iter().map(|s| s.ids.len()).sum();
    report.trained_tokens = train.iter().map(Sample::n_trained).sum();
    Ok(Dataset { train, val, report })
}

/// Groups samples (in the given order) into packed batches of at most `capacity` tokens each;
/// returns the sample indices of each batch.
pub fn pack(samples: &[&Sample], capacity: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for (i, s) in samples.iter().enumerate() {
        let n = s.ids.len().min(capacity);
        if out.is_empty() || used + n > capacity {
            out.push(Vec::new());
            used = 0;
        }
        if let Some(last) = out.last_mut() {
            last.push(i);
        }
        used += n;
    }
    out
}
