//! Scored answers at the trainer's evaluation points: the held-out exchanges answered with the
//! adapter as it is then, and scored against their own answers (exact match, token F1, ROUGE-L),
//! as `edgetune eval --generate` scores a finished adapter.

use std::sync::Arc;

use serde::Serialize;

use crate::data::Exchange;
use crate::error::{Error, Result};
use crate::infer::{self, GenerateOptions};
use crate::lora::GpuAdapter;
use crate::model::llama::Model;
use crate::score::AnswerScores;
use crate::tokenizer::Tokenizer;

/// Held-out exchanges the trainer answers and scores at each evaluation point
/// ([`crate::train::Trainer::score_answers_at_evals`]).
#[derive(Debug, Clone)]
pub struct AnswerEval {
    /// The model's tokenizer and chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// The exchanges ([`crate::data::exchanges`]).
    pub exchanges: Vec<Exchange>,
    /// How each answer is generated (greedy by default; `max_new_tokens` bounds the time an
    /// evaluation takes).
    pub opts: GenerateOptions,
}

/// The mean scores at an evaluation point: the base model's (the same at every point of a run)
/// and the adapter's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalAnswers {
    /// The base model's mean scores.
    pub base: AnswerScores,
    /// The adapter's mean scores at this point.
    pub adapter: AnswerScores,
}

impl AnswerEval {
    /// Every problem with these settings.
    pub fn check(&self) -> Result<()> {
        self.opts.validate()?;
        if self.exchanges.is_empty() {
            return Err(Error::invalid("answer evaluation", "has no exchanges to answer"));
        }
        Ok(())
    }

    /// The mean scores of the answers `model` gives with `adapter`, beside the base model's in
    /// `base`: where that is still `None`, the base's answers are decoded beside the adapter's
    /// and their scores kept there (they are the same at every evaluation point). All are
    /// decoded many at a time ([`infer::chat_rows`]).
    pub fn scores(&self, model: &Model, adapter: &GpuAdapter, base: &mut Option<AnswerScores>) -> Result<EvalAnswers> {
        // Each exchange's base answer (while it has none), then its adapter's.
        let per = 1 + usize::from(base.is_none());
        let requests: Vec<_> = self
            .exchanges
            .iter()
            .flat_map(|x| (0..per).map(move |k| infer::ChatRequest::exchange(x, (k + 1 == per).then_some(0))))
            .collect();
        let answers = infer::chat_rows(model, &[adapter], &self.tokenizer, &requests, &self.opts, |_| {})?;
        let mean = |k: usize| {
            let all: Vec<AnswerScores> = answers
                .chunks(per)
                .zip(&self.exchanges)
                .map(|(a, x)| AnswerScores::of(&a[k].text, &x.reference))
                .collect();
            AnswerScores::mean(&all)
        };
        Ok(EvalAnswers { base: *base.get_or_insert_with(|| mean(0)), adapter: mean(per - 1) })
    }
}
