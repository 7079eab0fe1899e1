//! `Session`: a model on the GPU with its tokenizer — the entry point most apps use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuOptions};
use crate::infer::{self, GenerateOptions, Generated};
use crate::lora::{Adapter, GpuAdapter, Layout};
use crate::model::llama::{LoadOptions, Model};
use crate::score::AnswerScores;
use crate::tokenizer::{Message, Tokenizer};
use crate::train::Rewards;

/// A request of [`Session::answer_many`].
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A plain prompt, continued as [`Session::generate_with`] continues it.
    Text(&'a str),
    /// Chat messages, answered as [`Session::chat_with`] answers them.
    Chat(&'a [Message]),
}

/// Requests that [`Session::answer_many`] decodes together.
#[derive(Debug, Clone, Copy)]
pub struct ManyRequests<'a> {
    /// Each request with the resident adapter it names ([`Session::keep_adapter`]), or `None`
    /// for the base model.
    pub requests: &'a [(Option<&'a str>, Prompt<'a>)],
    /// How to pick tokens and when to stop, for every request.
    pub opts: &'a GenerateOptions,
    /// The most requests a step decodes together; 0 for as many as a step takes
    /// ([`crate::model::llama::Model::most_decode_rows`]), and never more.
    pub rows: usize,
}

/// What [`Session::answer_many`] tells as its requests decode, each with its request's index.
#[derive(Debug, Clone, Copy)]
pub enum AnswerEvent<'a> {
    /// A new piece of a request's text.
    Text {
        /// The request's index.
        request: usize,
        /// The piece.
        text: &'a str,
    },
    /// A request ended, with what it generated (the entry the call returns for it).
    End {
        /// The request's index.
        request: usize,
        /// What it generated.
        generated: &'a Generated,
    },
}

/// An [`AnswerEvent`] handler that passes the pieces of text to `on_text` and nothing else.
fn texts_only(mut on_text: impl FnMut(usize, &str) -> bool) -> impl FnMut(AnswerEvent<'_>) -> bool {
    move |event| match event {
        AnswerEvent::Text { request, text } => on_text(request, text),
        AnswerEvent::End { .. } => true,
    }
}

/// A loaded model ready to generate and score text.
#[derive(Debug)]
pub struct Session {
    /// Shared with the trainers of this model ([`crate::train::Trainer::new`]).
    pub model: Arc<Model>,
    /// The model's tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// The model file or folder it was opened from.
    pub path: PathBuf,
    /// The LoRA adapter applied (unmerged) when generating and scoring, if any.
    pub adapter: Option<GpuAdapter>,
    /// Adapters kept on the GPU by name ([`Session::keep_adapter`]), for calls that name one.
    resident: BTreeMap<String, GpuAdapter>,
}

impl Session {
    /// Opens a model (Hugging Face folder or .gguf) on a new GPU context.
    pub fn open(path: impl AsRef<Path>, gpu: &GpuOptions, load: &LoadOptions) -> Result<Self> {
        let ctx = Arc::new(GpuContext::new(gpu)?);
        Self::open_with(ctx, path, load)
    }

    /// Opens a model on an existing GPU context.
    pub fn open_with(ctx: Arc<GpuContext>, path: impl AsRef<Path>, load: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
        let tokenizer = Tokenizer::open(path)?;
        let model = Arc::new(Model::open(ctx, path, load)?);
        Ok(Session { model, tokenizer, path: path.to_path_buf(), adapter: None, resident: BTreeMap::new() })
    }

    /// Applies `adapter` (unmerged) to everything this session generates and scores from now
    /// on; `None` goes back to the base model.
    pub fn set_adapter(&mut self, adapter: Option<&Adapter>) -> Result<()> {
        if let Some(a) = adapter {
            self.check_fits(a)?;
        }
        self.adapter = adapter.map(|a| GpuAdapter::upload(&self.model.ctx, a));
        Ok(())
    }

    fn check_fits(&self, a: &Adapter) -> Result<()> {
        let expected = Layout::new(&self.model.config, &a.config)?;
        if expected != a.layout || a.params.len() != a.layout.len {
            return Err(Error::invalid("adapter", "its layout does not fit this model's shapes"));
        }
        self.model.check_adapter_binds(&a.layout)
    }

    /// Keeps `adapter` on the GPU under `name` (replacing one of that name), beside any others:
    /// the calls that name it ([`Session::generate_with`], [`Session::chat_with`]) apply it
    /// with no upload, so one session serves several users or personas without switching.
    pub fn keep_adapter(&mut self, name: &str, adapter: &Adapter) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("adapter name", "is empty"));
        }
        self.check_fits(adapter)?;
        self.resident.insert(name.to_string(), GpuAdapter::upload(&self.model.ctx, adapter));
        Ok(())
    }

    /// Frees a resident adapter's GPU memory; false if none had that name.
    pub fn drop_adapter(&mut self, name: &str) -> bool {
        self.resident.remove(name).is_some()
    }

    /// The names of the resident adapters and the GPU bytes each holds (its A and B matrices
    /// in f32).
    pub fn resident_adapters(&self) -> Vec<(&str, u64)> {
        self.resident.iter().map(|(n, a)| (n.as_str(), a.layout.len as u64 * 4)).collect()
    }

    fn resident(&self, name: Option<&str>) -> Result<Option<&GpuAdapter>> {
        match name {
            None => Ok(None),
            Some(n) => self.resident.get(n).map(Some).ok_or_else(|| {
                let known: Vec<&str> = self.resident.keys().map(String::as_str).collect();
                Error::invalid("adapter", format!("no resident adapter named `{n}` (resident: {known:?})"))
            }),
        }
    }

    /// Loads a PEFT adapter folder and applies it (see [`Session::set_adapter`]).
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let a = crate::lora::load(dir.as_ref(), &self.model.config)?;
        self.set_adapter(Some(&a))
    }

    /// Generates a continuation of a plain prompt.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        self.generate_on(self.adapter.as_ref(), prompt, opts, on_text)
    }

    /// [`Session::generate`] with the resident adapter `adapter` ([`Session::keep_adapter`]),
    /// or the base model for `None`, whatever adapter the session applies otherwise.
    pub fn generate_with(
        &self,
        adapter: Option<&str>,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        self.generate_on(self.resident(adapter)?, prompt, opts, on_text)
    }

    /// Generates a continuation of several prompts at once, each with the resident adapter it
    /// names ([`Session::keep_adapter`]) or the base model for `None`: each gets what
    /// [`Session::generate_with`] gives it alone, and the steps decode one token of every
    /// sequence in one pass ([`infer::generate_rows`]), so serving several users costs little
    /// more than serving one. Any number of requests: a step takes as many as the GPU decodes at
    /// once, and each row takes the next request when its own ends. `on_text` gets each new
    /// piece of text with its request's index; returning `false` ends that request.
    pub fn generate_many(
        &self,
        requests: &[(Option<&str>, &str)],
        opts: &GenerateOptions,
        on_text: impl FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generated>> {
        let requests: Vec<_> = requests.iter().map(|&(name, p)| (name, Prompt::Text(p))).collect();
        self.answer_many(&ManyRequests { requests: &requests, opts, rows: 0 }, texts_only(on_text))
    }

    /// [`Session::generate_many`] for conversations: each request's messages rendered with the
    /// chat template and its generation prompt, answered as [`Session::chat_with`] answers them
    /// alone.
    pub fn chat_many(
        &self,
        requests: &[(Option<&str>, &[Message])],
        opts: &GenerateOptions,
        on_text: impl FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generated>> {
        let requests: Vec<_> = requests.iter().map(|&(name, m)| (name, Prompt::Chat(m))).collect();
        self.answer_many(&ManyRequests { requests: &requests, opts, rows: 0 }, texts_only(on_text))
    }

    /// Plain prompts and conversations decoded together, each with the resident adapter it
    /// names, as [`Session::generate_many`] and [`Session::chat_many`] decode them, `job.rows`
    /// at most at a time: each row takes the next request when its own ends
    /// ([`infer::generate_queue_each`]). `on_event` is told each new piece of text
    /// ([`AnswerEvent::Text`]; returning `false` ends that request) and each request's end with
    /// what it generated as soon as it ends ([`AnswerEvent::End`], in the order they end; what
    /// it returns is not read), so that an app can hand back a short answer while long ones go
    /// on, with one closure and one state for both.
    pub fn answer_many(
        &self,
        job: &ManyRequests<'_>,
        on_event: impl FnMut(AnswerEvent<'_>) -> bool,
    ) -> Result<Vec<Generated>> {
        let mut prompts = Vec::with_capacity(job.requests.len());
        for (i, &(_, prompt)) in job.requests.iter().enumerate() {
            prompts.push(match prompt {
                Prompt::Text("") => return Err(Error::invalid("prompt", format!("request {i} is empty"))),
                Prompt::Text(text) => self.tokenizer.encode_prompt(text)?,
                Prompt::Chat(messages) => {
                    let chat = infer::ChatRequest { messages, adapter: None, source: format!("request {i}") };
                    infer::chat_prompts(&self.model, &self.tokenizer, &[chat])?.swap_remove(0)
                }
            });
        }
        // Each adapter passed once.
        let mut names: Vec<&str> = Vec::new();
        let mut adapters: Vec<&GpuAdapter> = Vec::new();
        let mut rows = Vec::with_capacity(prompts.len());
        for (&(name, _), ids) in job.requests.iter().zip(&prompts) {
            let adapter = match (name, self.resident(name)?) {
                (Some(n), Some(a)) => Some(names.iter().position(|k| *k == n).unwrap_or_else(|| {
                    names.push(n);
                    adapters.push(a);
                    adapters.len() - 1
                })),
                _ => None,
            };
            rows.push(infer::RowRequest { prompt_ids: ids, adapter });
        }
        let wanted = if job.rows == 0 { rows.len() } else { job.rows };
        let n = infer::rows_for(&self.model, &adapters, wanted);
        let run = infer::RowsJob {
            model: &self.model,
            adapters: &adapters,
            tokenizer: &self.tokenizer,
            requests: &rows,
            opts: job.opts,
        };
        // The queue tells pieces and ends one at a time, never one inside the other.
        let on_event = std::cell::RefCell::new(on_event);
        infer::generate_queue_each(
            &run,
            n,
            |request, text| (on_event.borrow_mut())(AnswerEvent::Text { request, text }),
            |request, generated| {
                (on_event.borrow_mut())(AnswerEvent::End { request, generated });
            },
        )
    }

    fn generate_on(
        &self,
        lora: Option<&GpuAdapter>,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        let ids = self.tokenizer.encode_prompt(prompt)?;
        infer::generate(&self.model, lora, &self.tokenizer, &ids, opts, on_text)
    }

    /// Generates the assistant's reply to chat messages, rendered with the chat template.
    pub fn chat(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        self.chat_on(self.adapter.as_ref(), messages, opts, on_text)
    }

    /// [`Session::chat`] with a resident adapter by name (see [`Session::generate_with`]).
    pub fn chat_with(
        &self,
        adapter: Option<&str>,
        messages: &[Message],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        self.chat_on(self.resident(adapter)?, messages, opts, on_text)
    }

    fn chat_on(
        &self,
        lora: Option<&GpuAdapter>,
        messages: &[Message],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        infer::chat(&self.model, lora, &self.tokenizer, messages, opts, on_text)
    }

    /// Mean next-token loss of a text (and so its perplexity, `exp(loss)`).
    pub fn mean_loss(&self, text: &str) -> Result<f32> {
        let ids = self.tokenizer.encode_prompt(text)?;
        let cap = self.model.max_context;
        if ids.len() > cap {
            return Err(Error::invalid("text", format!("{} tokens exceed the context of {cap}", ids.len())));
        }
        self.model.mean_loss_with(&ids, self.adapter.as_ref())
    }

    /// Mean loss over the trained tokens of `samples` (for chat records, the assistant turns,
    /// with the template and mask training uses), with the session's adapter (`with_adapter`)
    /// or with the base model alone; and the number of tokens scored.
    pub fn samples_loss(&self, samples: &[crate::data::Sample], with_adapter: bool) -> Result<(f32, usize)> {
        let lora = if with_adapter { self.adapter.as_ref() } else { None };
        crate::data::check_context(samples, self.model.max_context, "data")?;
        let (mut total, mut n) = (0f64, 0usize);
        for (ids, train) in samples.iter().flat_map(crate::data::Sample::sequences) {
            let losses = self.model.token_losses_with(ids, lora)?;
            for (l, &scored) in losses.iter().zip(&train[1..]) {
                if scored {
                    total += f64::from(*l);
                    n += 1;
                }
            }
        }
        if n == 0 {
            return Err(Error::invalid("data", "no token to score"));
        }
        Ok(((total / n as f64) as f32, n))
    }

    /// How the session's adapter ranks held-out preference pairs against the base model as the
    /// reference (a fresh adapter's, see [`crate::train::dpo`]): the sigmoid DPO loss with
    /// `beta` and TRL's reward metrics, means over the pairs. Every sample must be a pair
    /// ([`crate::data::Sample::rejected_at`]).
    pub fn preference_rewards(&self, samples: &[crate::data::Sample], beta: f32) -> Result<(f32, Rewards)> {
        let adapter = self.adapter.as_ref().ok_or_else(|| {
            Error::invalid("adapter", "ranking preference pairs compares an adapter with the base; give one")
        })?;
        crate::data::check_context(samples, self.model.max_context, "data")?;
        let logp = |ids: &[u32], train: &[bool], lora: Option<&GpuAdapter>| -> Result<f64> {
            let losses = self.model.token_losses_with(ids, lora)?;
            Ok(-losses.iter().zip(&train[1..]).filter(|(_, t)| **t).map(|(l, _)| f64::from(*l)).sum::<f64>())
        };
        let mut stats = Vec::new();
        for s in samples {
            if s.rejected_at.is_none() {
                return Err(Error::format(&s.file, format!("line {}: not a preference pair", s.line)));
            }
            let mut ratio = [0f64; 2];
            let mut policy = [0f64; 2];
            for (i, (ids, train)) in s.sequences().into_iter().enumerate() {
                policy[i] = logp(ids, train, Some(adapter))?;
                ratio[i] = policy[i] - logp(ids, train, None)?;
            }
            let z = f64::from(beta) * (ratio[0] - ratio[1]);
            let loss = -(z.min(0.0) - (-z.abs()).exp().ln_1p());
            let b = f64::from(beta);
            stats.extend([loss, b * ratio[0], b * ratio[1], policy[0], policy[1]].map(|v| v as f32));
        }
        if stats.is_empty() {
            return Err(Error::invalid("data", "no preference pair to rank"));
        }
        Ok(Rewards::of(&stats))
    }

    /// Answers each held-out exchange with the base model and, when the session has one, with
    /// its adapter, and scores each answer against the record's own (exact match, token F1 and
    /// ROUGE-L; see [`crate::score`]). Each record is a conversation whose last message is the
    /// assistant's reference answer, or a preference pair of conversations whose chosen answer
    /// is the reference; the messages before it (with `system` put first where the record has
    /// no system message, as training does) are the prompt. The answers are decoded many at a
    /// time, each exchange's base answer beside its adapter's ([`infer::chat_rows`]): each is
    /// what [`Session::chat_with`] gives alone. `progress` is called with (answered, total) for
    /// each record, as the answers end.
    pub fn score_answers(
        &self,
        records: &[crate::data::formats::Sourced],
        system: Option<&str>,
        opts: &GenerateOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<AnswerReport> {
        opts.validate()?;
        let exchanges = crate::data::exchanges(records, system)?;
        // Each exchange's base answer, then its adapter's, decoded many rows at a time.
        let adapters: Vec<&GpuAdapter> = self.adapter.iter().collect();
        let per = 1 + adapters.len();
        let requests: Vec<infer::ChatRequest<'_>> = exchanges
            .iter()
            .flat_map(|x| (0..per).map(|k| infer::ChatRequest::exchange(x, k.checked_sub(1))))
            .collect();
        let mut reported = 0;
        let texts = infer::chat_rows(&self.model, &adapters, &self.tokenizer, &requests, opts, |n| {
            while reported < n / per {
                reported += 1;
                progress(reported, exchanges.len());
            }
        })?;
        let mut answers = Vec::with_capacity(exchanges.len());
        for (x, texts) in exchanges.iter().zip(texts.chunks(per)) {
            let base = texts[0].text.clone();
            let adapted = texts.get(1).map(|g| g.text.clone());
            let reference = &x.reference;
            answers.push(ScoredAnswer {
                file: x.file.clone(),
                line: x.line,
                question: x.question().to_string(),
                reference: reference.clone(),
                base_scores: AnswerScores::of(&base, reference),
                base,
                adapter_scores: adapted.as_deref().map(|a| AnswerScores::of(a, reference)),
                adapter: adapted,
            });
        }
        let base = AnswerScores::mean(&answers.iter().map(|a| a.base_scores).collect::<Vec<_>>());
        let adapter = self
            .adapter
            .as_ref()
            .map(|_| AnswerScores::mean(&answers.iter().filter_map(|a| a.adapter_scores).collect::<Vec<_>>()));
        Ok(AnswerReport { answers, base, adapter })
    }
}

/// One held-out exchange answered and scored ([`Session::score_answers`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoredAnswer {
    /// The file the record came from.
    pub file: PathBuf,
    /// Its 1-based line.
    pub line: usize,
    /// The last user message before the reference answer.
    pub question: String,
    /// The record's own answer.
    pub reference: String,
    /// The base model's greedy answer (or as `opts` sample it).
    pub base: String,
    /// The base answer's scores against the reference.
    pub base_scores: AnswerScores,
    /// The adapter's answer, when the session has an adapter.
    pub adapter: Option<String>,
    /// Its scores.
    pub adapter_scores: Option<AnswerScores>,
}

/// Every held-out answer and the mean scores, base against adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AnswerReport {
    /// One per record, in the file's order.
    pub answers: Vec<ScoredAnswer>,
    /// The base model's mean scores.
    pub base: AnswerScores,
    /// The adapter's mean scores, when the session has an adapter.
    pub adapter: Option<AnswerScores>,
}
