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
//! Validation: a user's own held-out file (`val_data`), a random share (`val_fraction`), or by
//! default the automatic rule of [`AUTO_SPLIT_MIN_SAMPLES`]: small datasets hold out only
//! samples whose answer another sample restates, so no fact leaves training.
//!
//! Chaining (`chain`): a small set of one-question records is also trained as conversations of
//! several records, drawn afresh for each epoch ([`CHAIN_ROUNDS`] draws), so each answer is
//! learned after other questions as well as alone (see [`AUTO_CHAIN_RECORDS`]).
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
use crate::prim::Rng;
use crate::tokenizer::{Message, Tokenizer};
pub use formats::{BadRecord, Format, Preference, Record};

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
    /// Keep every record.
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
    /// The files' format; `auto` tells each record's format from its fields.
    pub format: Format,
    /// Longest sample in tokens (also the text chunk length).
    pub max_len: usize,
    /// Which tokens of a chat sample are trained (by default the assistant's).
    pub train_on: TrainOn,
    /// What happens to a chat sample longer than `max_len`.
    pub truncation: Truncation,
    /// Which duplicate records are removed.
    pub dedup: Dedup,
    /// Samples with fewer tokens are dropped.
    pub min_tokens: usize,
    /// Share of the samples held out for validation at random (0 for none). Unset: automatic
    /// (see [`AUTO_SPLIT_MIN_SAMPLES`]).
    pub val_fraction: Option<f32>,
    /// A file (or folder) of the user's own held-out records, read like the training data: every
    /// sample in it validates and the training data is all trained. Excludes `val_fraction`.
    pub val_data: Option<PathBuf>,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Skip unreadable records (and count them) instead of failing on the first.
    pub skip_bad_records: bool,
    /// A system message for conversations that have none; without it the chat template's own
    /// default applies (SmolLM2's, for one, is a 20-token introduction). Generate with the same
    /// system message to ask the model as it was trained.
    pub system: Option<String>,
    /// Training records per conversation: each epoch trains records of one question and one
    /// answer chained this many at a time into multi-turn conversations (a fresh draw each
    /// epoch; validation samples stay single). 1 trains each record alone. Unset: automatic,
    /// [`AUTO_CHAIN_RECORDS`] for a small set of such records (see [`Chaining`]).
    pub chain: Option<usize>,
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
            val_fraction: None,
            val_data: None,
            seed: 0,
            skip_bad_records: false,
            system: None,
            chain: None,
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
        if self.chain == Some(0) {
            p.push("chain must be at least 1 (1 trains each record alone; leave it unset to choose)".into());
        }
        if let Some(f) = self.val_fraction
            && !(0.0..1.0).contains(&f)
        {
            p.push(format!("val_fraction must be in [0, 1) (got {f})"));
        }
        if let (Some(f), Some(file)) = (self.val_fraction, &self.val_data)
            && f > 0.0
        {
            p.push(format!(
                "val_fraction = {f} and val_data = {} both choose validation samples; set one",
                file.display()
            ));
        }
        p
    }
}

/// One tokenized sample: `train[i]` says whether token i is a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Token ids, with the chat template applied.
    pub ids: Vec<u32>,
    /// Whether each token is a target (predicted from those before it and scored).
    pub train: Vec<bool>,
    /// The file of the record it came from.
    pub file: PathBuf,
    /// The record's 1-based line.
    pub line: usize,
    /// A preference pair (DPO): the chosen sequence is `ids[..k]` and the rejected one
    /// `ids[k..]`, each the prompt followed by its completion, the completion's tokens the
    /// targets. The two are packed into the same batch and never attend to each other.
    pub rejected_at: Option<usize>,
    /// A conversation of chained records ([`DataConfig::chain`]): the lines of the records after
    /// the first (`line`), in order; empty otherwise.
    pub chained_lines: Vec<usize>,
}

impl Sample {
    /// A sample of one sequence.
    pub fn new(ids: Vec<u32>, train: Vec<bool>, file: PathBuf, line: usize) -> Sample {
        Sample { ids, train, file, line, rejected_at: None, chained_lines: Vec::new() }
    }

    /// The sequences of the sample as (ids, train) slices: one, or a pair's two.
    pub fn sequences(&self) -> Vec<(&[u32], &[bool])> {
        match self.rejected_at {
            Some(k) => vec![(&self.ids[..k], &self.train[..k]), (&self.ids[k..], &self.train[k..])],
            None => vec![(&self.ids[..], &self.train[..])],
        }
    }

    /// The longest of its sequences, in tokens (what the model's context must hold).
    pub fn longest_sequence(&self) -> usize {
        self.sequences().iter().map(|(ids, _)| ids.len()).max().unwrap_or(0)
    }

    /// The tokens that are targets (the first token never is: nothing precedes it).
    pub fn n_trained(&self) -> usize {
        self.sequences().iter().map(|(_, t)| t.iter().skip(1).filter(|&&t| t).count()).sum()
    }
}

/// An error naming the first of `samples` longer than the model's `context`, as `field`'s fault.
pub fn check_context<'a>(samples: impl IntoIterator<Item = &'a Sample>, context: usize, field: &str) -> Result<()> {
    match samples.into_iter().find(|s| s.longest_sequence() > context) {
        Some(s) => Err(Error::invalid(
            field,
            format!(
                "{}:{}: a sample of {} tokens exceeds the model's context of {context}",
                s.file.display(),
                s.line,
                s.longest_sequence()
            ),
        )),
        None => Ok(()),
    }
}

/// What happened to the records of a dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataReport {
    /// Records read, bad ones included.
    pub records: usize,
    /// Records that could not be read or tokenized.
    pub bad_records: usize,
    /// Records dropped as duplicates of earlier ones (see [`Dedup`]).
    pub duplicates: usize,
    /// Samples dropped for having fewer than `min_tokens` tokens.
    pub too_short: usize,
    /// Samples cut to `max_len` tokens.
    pub truncated: usize,
    /// Samples dropped for being longer than `max_len` tokens.
    pub dropped_too_long: usize,
    /// Samples trained.
    pub train_samples: usize,
    /// Samples held out for validation.
    pub val_samples: usize,
    /// Tokens of the training samples.
    pub train_tokens: usize,
    /// Of those, the targets (see [`Sample::n_trained`]).
    pub trained_tokens: usize,
    /// The first few bad records, for display.
    pub bad_examples: Vec<String>,
    /// Where the validation samples come from.
    pub validation: Validation,
    /// Whether training records are chained into conversations.
    pub chaining: Chaining,
}

/// How the training records are grouped into conversations ([`DataConfig::chain`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Chaining {
    /// Records per conversation (1: each alone).
    pub records: usize,
    /// Whether the rule chose it (`chain` unset).
    pub automatic: bool,
    /// The choice in words, for the start of a run.
    pub why: String,
}

/// Where a dataset's validation samples come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSource {
    /// No validation: every sample is trained.
    #[default]
    None,
    /// Samples whose answer another training sample restates (the automatic rule below
    /// [`AUTO_SPLIT_MIN_SAMPLES`]).
    Restated,
    /// A random share of the samples.
    Split,
    /// The user's own held-out file (`val_data`).
    File,
}

/// How a dataset was split, and whether its validation loss may choose the adapter.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Validation {
    /// Where the validation samples come from.
    pub source: ValSource,
    /// The share of the samples held out (0 with a file or with none).
    pub fraction: f32,
    /// Whether a lower validation loss means a better adapter: true for the user's own file, the
    /// automatic rule's samples and a random split of a large set. `keep_best`'s automatic value.
    pub meaningful: bool,
    /// The choice in words, for the start of a run.
    pub why: String,
}

/// A tokenized dataset, split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The samples trained.
    pub train: Vec<Sample>,
    /// The samples that validate (none unless a split or a `val_data` file gives some).
    pub val: Vec<Sample>,
    /// What happened to the records on the way.
    pub report: DataReport,
    /// With chaining ([`DataConfig::chain`] above 1): the training samples of each epoch, a
    /// fresh draw of conversations each (epoch e trains `rounds[e % rounds.len()]`); every draw
    /// has as many conversations. Empty: every epoch trains `train`.
    pub rounds: Vec<Vec<Sample>>,
}

impl Dataset {
    /// The samples epoch `epoch` (from 0) trains.
    pub fn epoch_samples(&self, epoch: usize) -> &[Sample] {
        if self.rounds.is_empty() { &self.train } else { &self.rounds[epoch % self.rounds.len()] }
    }
}

fn normalize(s: &str, how: Dedup) -> String {
    match how {
        Dedup::Normalized => s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" "),
        _ => s.to_string(),
    }
}

fn record_key(r: &Record, how: Dedup) -> String {
    let chat = |m: &[Message]| {
        m.iter().map(|m| format!("{}\u{1}{}", m.role, normalize(&m.content, how))).collect::<Vec<_>>().join("\u{2}")
    };
    match r {
        Record::Text(t) => normalize(t, how),
        Record::Chat(m) => chat(m),
        Record::Preference(Preference::Chat { prompt, chosen, rejected }) => {
            format!("\u{3}{}\u{3}{}\u{3}{}", chat(prompt), chat(chosen), chat(rejected))
        }
        Record::Preference(Preference::Text { prompt, chosen, rejected }) => {
            format!("\u{4}{}\u{4}{}\u{4}{}", normalize(prompt, how), normalize(chosen, how), normalize(rejected, how))
        }
    }
}

/// Leading tokens two sequences share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A preference pair tokenized as TRL's DPOTrainer does: the prompt alone (conversations with the
/// generation prompt; text with the tokenizer's BOS where it adds one) and the prompt followed by
/// each completion (text completions end with the EOS token's text, added if missing); each
/// completion starts where its tokens part from the prompt's. Returns the pair as one sample's
/// ids and targets (the completions' tokens) and where the rejected sequence starts.
pub fn tokenize_preference(
    tok: &Tokenizer,
    pref: &Preference,
    system: Option<&str>,
) -> std::result::Result<(Vec<u32>, Vec<bool>, usize), String> {
    let err = |e: Error| e.to_string();
    let (prompt, chosen, rejected) = match pref {
        Preference::Chat { prompt, chosen, rejected } => {
            let prompt = with_system(prompt, system);
            let full = |c: &[Message]| -> std::result::Result<Vec<u32>, String> {
                let msgs: Vec<Message> = prompt.iter().chain(c).cloned().collect();
                tok.encode(&tok.apply_chat_template(&msgs, false).map_err(err)?).map_err(err)
            };
            let p = tok.encode(&tok.apply_chat_template(&prompt, true).map_err(err)?).map_err(err)?;
            (p, full(chosen)?, full(rejected)?)
        }
        Preference::Text { prompt, chosen, rejected } => {
            let eos = tok.eos_token.as_deref().ok_or(
                "the tokenizer names no end-of-sequence token to end a text completion with; give the pair as \
                 conversations",
            )?;
            let full = |c: &str| {
                let end = if c.ends_with(eos) { "" } else { eos };
                tok.encode_prompt(&format!("{prompt}{c}{end}")).map_err(err)
            };
            (tok.encode_prompt(prompt).map_err(err)?, full(chosen)?, full(rejected)?)
        }
    };
    let at = common_prefix(&prompt, &chosen).min(common_prefix(&prompt, &rejected));
    for (seq, which) in [(&chosen, "chosen"), (&rejected, "rejected")] {
        if seq.len() == at {
            return Err(format!("the {which} completion is empty once tokenized"));
        }
    }
    let train = |n: usize| (0..n).map(move |j| j >= at);
    let ids = chosen.iter().chain(&rejected).copied().collect();
    Ok((ids, train(chosen.len()).chain(train(rejected.len())).collect(), chosen.len()))
}

/// A pair whose sequences are longer than `max_len`, each cut to its first `max_len` tokens
/// (TRL's `keep_start`); `None` when a completion then has no token left.
fn truncate_pair(ids: &[u32], train: &[bool], k: usize, max_len: usize) -> Option<(Vec<u32>, Vec<bool>, usize)> {
    let (mut out_ids, mut out_train) = (Vec::new(), Vec::new());
    let mut rejected_at = 0;
    for (i, (from, to)) in [(0, k), (k, ids.len())].into_iter().enumerate() {
        let end = to.min(from + max_len);
        if !train[from..end].iter().any(|&t| t) {
            return None;
        }
        if i == 1 {
            rejected_at = out_ids.len();
        }
        out_ids.extend_from_slice(&ids[from..end]);
        out_train.extend_from_slice(&train[from..end]);
    }
    Some((out_ids, out_train, rejected_at))
}

/// A held-out exchange to answer and score: the prompt and the record's own answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The file the record came from.
    pub file: PathBuf,
    /// Its 1-based line.
    pub line: usize,
    /// The messages before the reference answer (with the system message put first where the
    /// record has none, as training does).
    pub prompt: Vec<Message>,
    /// The record's own answer: the last assistant message, or a pair's chosen answer.
    pub reference: String,
}

impl Exchange {
    /// The last user message of the prompt.
    pub fn question(&self) -> &str {
        self.prompt.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str())
    }
}

/// The exchanges of held-out `records`: each a conversation whose last message is the
/// assistant's reference answer, or a preference pair of conversations whose chosen answer is
/// the reference. A plain text, or a conversation that does not end in an answer to a user
/// message, is an error naming its file and line; so is an empty list.
pub fn exchanges(records: &[formats::Sourced], system: Option<&str>) -> Result<Vec<Exchange>> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let at = |what: &str| Error::format(&r.file, format!("line {}: {what}", r.line));
        let joined;
        let msgs = match &r.record {
            Record::Chat(msgs) => msgs,
            Record::Preference(Preference::Chat { prompt, chosen, .. }) => {
                joined = prompt.iter().chain(chosen).cloned().collect::<Vec<_>>();
                &joined
            }
            Record::Text(_) | Record::Preference(Preference::Text { .. }) => {
                return Err(at("a plain text has no reference answer; scoring answers needs conversations"));
            }
        };
        let (last, before) = msgs.split_last().ok_or_else(|| at("the conversation is empty"))?;
        if last.role != "assistant" || !before.iter().any(|m| m.role == "user") {
            return Err(at("the last message must be the assistant's reference answer, after a user message"));
        }
        out.push(Exchange {
            file: r.file.clone(),
            line: r.line,
            prompt: with_system(before, system).into_owned(),
            reference: last.content.clone(),
        });
    }
    if out.is_empty() {
        return Err(Error::invalid("data", "no held-out exchange to answer"));
    }
    Ok(out)
}

/// The conversation with `system` put first when it has no system message of its own.
pub fn with_system<'a>(msgs: &'a [Message], system: Option<&str>) -> Cow<'a, [Message]> {
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
    Records {
        /// The label that errors name.
        name: String,
        /// The records, one JSON object each.
        records: Vec<String>,
    },
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

/// A sample with the normalized text of its answers (assistant turns), by which the automatic
/// validation rule finds answers that other samples restate.
struct Keyed {
    sample: Sample,
    answer: Option<String>,
    /// One question and its answer (after the system message, if any): what chaining joins.
    exchange: Option<Vec<Message>>,
}

/// Records → deduplicated, tokenized, length-filtered samples, counting what happened in
/// `report`; bad records go to `bad`. `seen` carries the dedup keys across calls, so a
/// validation record identical to a training one is dropped as a duplicate.
fn samples_of(
    records: Vec<formats::Sourced>,
    tok: &Tokenizer,
    cfg: &DataConfig,
    seen: &mut HashSet<String>,
    report: &mut DataReport,
    bad: &mut Vec<BadRecord>,
) -> Result<Vec<Keyed>> {
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
                    let sample = Sample::new(chunk.to_vec(), train, r.file.clone(), r.line);
                    samples.push(Keyed { sample, answer: None, exchange: None });
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
                    let answers: Vec<String> = msgs
                        .iter()
                        .filter(|m| m.role == "assistant")
                        .map(|m| normalize(&m.content, Dedup::Normalized))
                        .collect();
                    let answer = (!answers.is_empty()).then(|| answers.join("\u{2}"));
                    let full = with_system(msgs, cfg.system.as_deref());
                    let roles: Vec<&str> = full.iter().map(|m| m.role.as_str()).collect();
                    let exchange = matches!(roles.as_slice(), ["user", "assistant"] | ["system", "user", "assistant"])
                        .then(|| full.into_owned());
                    let sample = Sample::new(ids, train, r.file.clone(), r.line);
                    samples.push(Keyed { sample, answer, exchange });
                }
                Err(what) => bad.push(BadRecord { file: r.file.clone(), line: r.line, what }),
            },
            Record::Preference(p) => match tokenize_preference(tok, p, cfg.system.as_deref()) {
                Ok((mut ids, mut train, mut k)) => {
                    if k.max(ids.len() - k) > cfg.max_len {
                        let cut = match cfg.truncation {
                            Truncation::Drop => None,
                            Truncation::Right => truncate_pair(&ids, &train, k, cfg.max_len),
                        };
                        let Some(cut) = cut else {
                            report.dropped_too_long += 1;
                            continue;
                        };
                        (ids, train, k) = cut;
                        report.truncated += 1;
                    }
                    let sample = Sample { rejected_at: Some(k), ..Sample::new(ids, train, r.file.clone(), r.line) };
                    samples.push(Keyed { sample, answer: None, exchange: None });
                }
                Err(what) => bad.push(BadRecord { file: r.file.clone(), line: r.line, what }),
            },
        }
    }
    let before = samples.len();
    samples.retain(|k| k.sample.longest_sequence() >= cfg.min_tokens.max(2) && k.sample.n_trained() > 0);
    report.too_short += before - samples.len();
    Ok(samples)
}

/// Reads every source; records that cannot be read go to `bad`.
fn read_sources(
    sources: &[Source],
    cfg: &DataConfig,
    report: &mut DataReport,
    bad: &mut Vec<BadRecord>,
) -> Result<Vec<formats::Sourced>> {
    let mut records = Vec::new();
    let mut read_bytes = 0;
    for source in sources {
        let (r, b) = match source {
            Source::Path(p) => formats::read(p, cfg.format, &mut read_bytes)?,
            Source::Records { name, records } => formats::read_records(Path::new(name), records, cfg.format),
        };
        report.records += r.len() + b.len();
        records.extend(r);
        bad.extend(b);
    }
    Ok(records)
}

/// Counts the bad records (unreadable, or not tokenizable) and fails on the first unless
/// `skip_bad_records`.
fn check_bad(bad: &[BadRecord], cfg: &DataConfig, report: &mut DataReport) -> Result<()> {
    report.bad_records += bad.len();
    report.bad_examples.extend(bad.iter().map(ToString::to_string));
    report.bad_examples.truncate(5);
    match bad.first() {
        Some(first) if !cfg.skip_bad_records => {
            let more = if bad.len() > 1 { format!(" (and {} more bad records)", bad.len() - 1) } else { String::new() };
            Err(Error::format(
                &first.file,
                format!("line {}: {}{more}; set skip_bad_records to skip them", first.line, first.what),
            ))
        }
        _ => Ok(()),
    }
}

/// Below this many samples, the automatic rule holds out no sample at random: in the small
/// sets apps personalize with, each record tends to state something no other record does (a
/// fact about the user), so a held-out record takes its fact out of training and its loss can
/// only rise as training succeeds. Such sets hold out only samples whose answer another sample
/// restates (the same fact asked another way), at most [`AUTO_VAL_FRACTION`] of them and one per
/// answer; with none, everything is trained. From this many samples on, the usual random
/// [`AUTO_VAL_FRACTION`] is held out.
pub const AUTO_SPLIT_MIN_SAMPLES: usize = 1000;

/// The share the automatic rule holds out.
pub const AUTO_VAL_FRACTION: f32 = 0.1;

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
    let mut report = DataReport::default();
    let mut bad = Vec::new();
    let records = read_sources(sources, cfg, &mut report, &mut bad)?;
    let labels: Vec<String> = sources.iter().map(|s| s.label().display().to_string()).collect();
    let path = PathBuf::from(labels.join(", "));
    let mut seen = HashSet::new();
    let samples = samples_of(records, tok, cfg, &mut seen, &mut report, &mut bad)?;
    check_bad(&bad, cfg, &mut report)?;
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
    let set_size = samples.len();
    let (train, val, validation) = match &cfg.val_data {
        Some(file) => {
            let mut vr = DataReport::default();
            let mut vbad = Vec::new();
            let records = read_sources(&[Source::Path(file.clone())], cfg, &mut vr, &mut vbad)?;
            let val = samples_of(records, tok, cfg, &mut seen, &mut vr, &mut vbad)?;
            check_bad(&vbad, cfg, &mut vr)?;
            if val.is_empty() {
                return Err(Error::format(
                    file,
                    format!(
                        "val_data has no usable validation sample: {} records, {} duplicates of training records, \
                         {} too short, {} too long",
                        vr.records, vr.duplicates, vr.too_short, vr.dropped_too_long
                    ),
                ));
            }
            let why = format!(
                "{} samples of val_data {} validate; all {} training samples are trained",
                val.len(),
                file.display(),
                samples.len()
            );
            let v = Validation { source: ValSource::File, fraction: 0.0, meaningful: true, why };
            (samples, val, v)
        }
        None => split(samples, cfg),
    };
    let (rounds, chaining) = chain(&train, set_size, tok, cfg)?;
    let train: Vec<Sample> = train.into_iter().map(|k| k.sample).collect();
    let val: Vec<Sample> = val.into_iter().map(|k| k.sample).collect();
    report.train_samples = train.len();
    report.val_samples = val.len();
    report.train_tokens = train.iter().map(|s| s.ids.len()).sum();
    report.trained_tokens = train.iter().map(Sample::n_trained).sum();
    report.validation = validation;
    report.chaining = chaining;
    Ok(Dataset { train, val, report, rounds })
}

/// Records per conversation that the automatic rule chains a small set into.
///
/// From runs of SmolLM2-135M-Instruct on the fact set (`tests/data/facts`: sixteen records, one
/// fact each, asked back in other words) over ten seeds (`tests/reference/recall_sweep.py`):
/// trained one record per sample, greedy answers carried the fact for 4.0 of 6 questions on
/// average (2 at worst); chained four at a time with a fresh draw each epoch, 4.7 (3 at worst),
/// at the same number of optimizer steps and fewer tokens (the system message once per
/// conversation). One draw kept for the whole run recalled 3.5: the gain is from each answer
/// following different questions from one epoch to the next, which teaches the model to tell
/// the questions apart. With edgetune itself, five seeds: 13 of 30 alone, 17 of 30 chained.
pub const AUTO_CHAIN_RECORDS: usize = 4;

/// Draws of conversations made for a chained set: epoch e trains draw e mod this (the most
/// epochs the automatic rule chooses).
pub const CHAIN_ROUNDS: usize = 12;

/// The training samples of each epoch when records are chained (see [`DataConfig::chain`]),
/// and what was decided. With `chain` unset, a set of fewer than [`AUTO_SPLIT_MIN_SAMPLES`]
/// samples (`set_size`, before validation samples are held out), its training samples all one question and one answer under the same system message
/// (or none) and at least two conversations' worth, is chained [`AUTO_CHAIN_RECORDS`] at a
/// time. A conversation longer than `max_len` makes the set train unchained (automatic) or is
/// an error naming its records (explicit).
fn chain(train: &[Keyed], set_size: usize, tok: &Tokenizer, cfg: &DataConfig) -> Result<(Vec<Vec<Sample>>, Chaining)> {
    let automatic = cfg.chain.is_none();
    let alone = |why: String| Ok((Vec::new(), Chaining { records: 1, automatic, why }));
    if automatic && train.iter().any(|k| k.sample.rejected_at.is_some()) {
        return alone("each preference pair is trained alone (automatic: pairs are not chained)".into());
    }
    let k = match cfg.chain {
        Some(k) if k <= 1 => return alone("chain = 1: each record is trained alone".into()),
        Some(k) => k,
        None if set_size >= AUTO_SPLIT_MIN_SAMPLES => {
            return alone(format!(
                "each record is trained alone (automatic: a set of {set_size} samples, at least \
                 {AUTO_SPLIT_MIN_SAMPLES})"
            ));
        }
        None => AUTO_CHAIN_RECORDS,
    };
    let refuse = |why: String| -> Result<(Vec<Vec<Sample>>, Chaining)> {
        if automatic {
            alone(format!("each record is trained alone (automatic: {why})"))
        } else {
            Err(Error::invalid("data.chain", format!("chain = {k}: {why}; set chain = 1")))
        }
    };
    let system = |k: &Keyed| k.exchange.as_ref().and_then(|m| (m[0].role == "system").then(|| m[0].content.clone()));
    if let Some(bad) = train.iter().find(|k| k.exchange.is_none()) {
        return refuse(format!(
            "{}:{} is not one question and one answer, so records are not chained",
            bad.sample.file.display(),
            bad.sample.line
        ));
    }
    if let Some(bad) = train.iter().find(|x| system(x) != system(&train[0])) {
        return refuse(format!(
            "{}:{} has another system message than {}:{}, so records are not chained",
            bad.sample.file.display(),
            bad.sample.line,
            train[0].sample.file.display(),
            train[0].sample.line
        ));
    }
    if train.len() < 2 * k {
        return refuse(format!("{} records make fewer than two conversations of {k}", train.len()));
    }
    let mut rounds = Vec::with_capacity(CHAIN_ROUNDS);
    for round in 0..CHAIN_ROUNDS {
        let mut order: Vec<usize> = (0..train.len()).collect();
        Rng::new(cfg.seed ^ (0xc4a1_0000 + round as u64)).shuffle(&mut order);
        let mut samples = Vec::new();
        for group in order.chunks(k) {
            let mut msgs: Vec<Message> = Vec::new();
            for &i in group {
                let m = train[i].exchange.as_deref().unwrap_or_default();
                let skip = usize::from(!msgs.is_empty() && m.first().is_some_and(|m| m.role == "system"));
                msgs.extend(m[skip..].iter().cloned());
            }
            let first = &train[group[0]].sample;
            let lines = || group.iter().map(|&i| train[i].sample.line.to_string()).collect::<Vec<_>>().join(", ");
            let (ids, flags) = tokenize_chat(tok, &msgs, cfg.train_on)
                .map_err(|e| Error::format(&first.file, format!("records at lines {} chained: {e}", lines())))?;
            if ids.len() > cfg.max_len {
                return refuse(format!(
                    "the records at lines {} of {} chained make {} tokens, over max_len = {}",
                    lines(),
                    first.file.display(),
                    ids.len(),
                    cfg.max_len
                ));
            }
            let chained_lines = group[1..].iter().map(|&i| train[i].sample.line).collect();
            samples.push(Sample { chained_lines, ..Sample::new(ids, flags, first.file.clone(), first.line) });
        }
        rounds.push(samples);
    }
    let why = format!(
        "{} records trained {k} to a conversation, {} conversations an epoch, drawn afresh for each of {CHAIN_ROUNDS} \
         epochs before the draws repeat{}",
        train.len(),
        train.len().div_ceil(k),
        if automatic { " (automatic: a small set of one-question records)" } else { "" }
    );
    Ok((rounds, Chaining { records: k, automatic, why }))
}

/// The seeded train/validation split: `val_fraction` at random when set, else the automatic
/// rule of [`AUTO_SPLIT_MIN_SAMPLES`].
fn split(samples: Vec<Keyed>, cfg: &DataConfig) -> (Vec<Keyed>, Vec<Keyed>, Validation) {
    let n = samples.len();
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(cfg.seed).shuffle(&mut order);
    let share = |f: f32| if f > 0.0 && n >= 2 { ((n as f32 * f).round() as usize).clamp(1, n - 1) } else { 0 };
    let (held, validation): (Vec<usize>, Validation) = match cfg.val_fraction {
        Some(f) => {
            let k = share(f);
            let why = if k == 0 {
                format!("val_fraction = {f}: all {n} samples are trained, none validate")
            } else if n >= AUTO_SPLIT_MIN_SAMPLES {
                format!("val_fraction = {f}: {k} of {n} samples held out at random")
            } else {
                format!(
                    "val_fraction = {f}: {k} of {n} samples held out at random; with fewer than \
                     {AUTO_SPLIT_MIN_SAMPLES} samples they may state what no training sample does, so their loss \
                     does not choose the adapter unless keep_best is set"
                )
            };
            let v = Validation {
                source: if k == 0 { ValSource::None } else { ValSource::Split },
                fraction: f,
                meaningful: k > 0 && n >= AUTO_SPLIT_MIN_SAMPLES,
                why,
            };
            (order[..k].to_vec(), v)
        }
        None if n >= AUTO_SPLIT_MIN_SAMPLES => {
            let k = share(AUTO_VAL_FRACTION);
            let why = format!(
                "{k} of {n} samples held out at random (automatic: {AUTO_VAL_FRACTION} of a set of at least \
                 {AUTO_SPLIT_MIN_SAMPLES})"
            );
            (
                order[..k].to_vec(),
                Validation { source: ValSource::Split, fraction: AUTO_VAL_FRACTION, meaningful: true, why },
            )
        }
        None => {
            // Samples whose answer another sample gives too: hold out at most one per answer.
            let mut count = std::collections::HashMap::<&str, usize>::new();
            for k in &samples {
                if let Some(a) = &k.answer {
                    *count.entry(a.as_str()).or_default() += 1;
                }
            }
            let cap = ((n as f32 * AUTO_VAL_FRACTION).round() as usize).max(1);
            let mut taken = HashSet::new();
            let held: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| samples[i].answer.as_deref().is_some_and(|a| count[a] >= 2 && taken.insert(a.to_string())))
                .take(cap)
                .collect();
            let why = if held.is_empty() {
                format!(
                    "all {n} samples are trained, none validate (automatic: fewer than {AUTO_SPLIT_MIN_SAMPLES} \
                     samples, and no answer is restated by another sample, so holding one out would take what it \
                     teaches out of training; give held-out records with val_data to validate)"
                )
            } else {
                format!(
                    "{} of {n} samples validate, each one whose answer another training sample restates \
                     (automatic: fewer than {AUTO_SPLIT_MIN_SAMPLES} samples, so none is held out at random)",
                    held.len()
                )
            };
            let source = if held.is_empty() { ValSource::None } else { ValSource::Restated };
            let fraction = if held.is_empty() { 0.0 } else { held.len() as f32 / n as f32 };
            (held, Validation { source, fraction, meaningful: source == ValSource::Restated, why })
        }
    };
    let held: HashSet<usize> = held.into_iter().collect();
    let mut slots: Vec<Option<Keyed>> = samples.into_iter().map(Some).collect();
    // Validation in draw order, training in the shuffled order (as before the rule existed).
    let val: Vec<Keyed> = order.iter().filter(|i| held.contains(i)).filter_map(|&i| slots[i].take()).collect();
    let train: Vec<Keyed> = order.iter().filter_map(|&i| slots[i].take()).collect();
    (train, val, validation)
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
