//! Settings chosen from the data: the automatic values of the `TrainConfig` fields left unset
//! (`batch_tokens`, `epochs`, `learning_rate`, `warmup_steps`, `keep_best`).
//!
//! The rule, in the order the trainer applies it:
//!
//! 0. **Conversations.** Decided with the data ([`crate::data::DataConfig::chain`]): a small set
//!    of one-question records trains as conversations of [`crate::data::AUTO_CHAIN_RECORDS`]
//!    records, a fresh draw each epoch, unless they do not fit the model's context or one pass of
//!    its GPU ([`super::ModelLimits`]). The rules below then measure the first draw.
//! 1. **Tokens per step.** About [`BATCHES_PER_EPOCH`] optimizer steps an epoch for a small
//!    set: `batch_tokens` is the training tokens divided by that, rounded up to a multiple of 64,
//!    at most [`MAX_AUTO_BATCH_TOKENS`] and the most the GPU trains in one pass (a wide model on
//!    a GPU that binds 128 MiB at a time runs fewer), and never less than the longest sample.
//!    Sixteen short
//!    records (773 tokens alone with SmolLM2's template, 521 as four conversations) then make
//!    four steps of 192 tokens an epoch (256 alone), not one of 1024. Packing whole samples can make one or two more batches; rule 2 counts the
//!    batches there are.
//! 2. **Epochs.** Enough passes for [`MIN_AUTO_STEPS`] optimizer steps, between
//!    [`DEFAULT_EPOCHS`] (what peers use on large sets) and [`MAX_AUTO_EPOCHS`]. A large set gets
//!    the usual 3 epochs; a few dozen records get as many as learning them takes.
//! 3. **Learning rate.** [`BASE_LR`] for the reference adapter (r 16, alpha 32, plain LoRA) on a
//!    run of at least [`LONG_RUN_STEPS`] steps, raised for shorter runs in proportion to
//!    `LONG_RUN_STEPS / steps` up to [`MAX_SHORT_RUN_FACTOR`] times, so a short run moves the
//!    adapter as far as a long one does. Then scaled for the rank: with Adam every entry of B
//!    moves by about the learning rate per step whatever its gradient's size, and the update
//!    `scale · B A` sums r such entries, so the change of the weights grows as `scale · r`
//!    (alpha for plain LoRA, `alpha · sqrt(r)` with rsLoRA). The rate is divided by that over
//!    the reference's 32, which keeps the step in weight space the reference's. DPO
//!    (`method = "dpo"`) takes [`DPO_LR_FACTOR`] of that: its loss has no floor at the data, and
//!    at the supervised rate a small preference set drives the policy to degenerate answers
//!    within a few steps (see the constant).
//! 4. **Warmup.** [`WARMUP_FRACTION`] of the steps, rounded down (QLoRA's 3 %): a run of
//!    fewer than 34 steps has none, since transformers' warmup gives its first step a rate of 0
//!    and a short run cannot spare it.
//! 5. **keep_best.** On when the validation set's loss is meaningful (see
//!    [`crate::data::Validation::meaningful`]); otherwise the final adapter is returned, as
//!    transformers' Trainer and MLX-LM do.
//!
//! The constants come from runs of SmolLM2-135M-Instruct on the fact set in `tests/data/facts`
//! and the persona set in `sdk/data/persona` (the README lists them). An explicit setting always
//! wins, and the values chosen are recorded with the run's settings, so a run can be repeated
//! exactly.

use serde::Serialize;

use crate::lora::LoraConfig;

/// An epoch of a small set takes about this many optimizer steps.
pub const BATCHES_PER_EPOCH: usize = 4;
/// The automatic `batch_tokens` is at most this (unless a sample is longer).
pub const MAX_AUTO_BATCH_TOKENS: usize = 1024;
/// Automatic epochs aim at this many optimizer steps in all.
pub const MIN_AUTO_STEPS: u64 = 24;
/// The fewest automatic epochs: what a large set gets.
pub const DEFAULT_EPOCHS: u64 = 3;
/// The most automatic epochs.
pub const MAX_AUTO_EPOCHS: u64 = 12;
/// Peak learning rate of the reference adapter (r 16, alpha 32) on a long run (QLoRA's).
pub const BASE_LR: f32 = 2e-4;
/// Runs of at least this many steps get [`BASE_LR`].
pub const LONG_RUN_STEPS: u64 = 720;
/// Shorter runs get at most this many times [`BASE_LR`].
pub const MAX_SHORT_RUN_FACTOR: f32 = 20.0;
/// DPO's share of the supervised rate. Measured on SmolLM2-135M-Instruct with the feedback set
/// in `sdk/data/feedback` (24 pairs, 24 steps): at the supervised rate (4e-3 there) the loss is 0
/// by step 2 and every generated answer is empty; at a tenth (4e-4) the held-out pairs are
/// ranked right (accuracy 1.0, margin 20) and the answers turn concise (25.4 words on average
/// to 3.0, the chosen answers' style) without collapsing. Peers' recipes sit lower still
/// (QLoRA SFT at 2e-4 and DPO at 5e-6 in Hugging Face's alignment handbook) for long runs,
/// where the supervised rate here is 2e-4 too.
pub const DPO_LR_FACTOR: f32 = 0.1;
/// `scale · r` of the reference adapter (r 16, alpha 32, plain LoRA).
pub const REFERENCE_SCALE_TIMES_RANK: f32 = 32.0;
/// Warmup steps as a share of the run.
pub const WARMUP_FRACTION: f64 = 0.03;

/// What the automatic rule needs to know of the training data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    /// Training samples.
    pub samples: usize,
    /// Tokens of all training samples.
    pub tokens: usize,
    /// Tokens of the longest training sample.
    pub longest: usize,
}

/// One setting the rule chose, for the start of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    /// The `TrainConfig` field, as in the TOML file (`learning_rate`), or `validation` for how
    /// the validation samples were chosen (`none`, `restated`, `split` or `file`).
    pub setting: String,
    /// The value chosen, as the TOML file would write it.
    pub value: String,
    /// Why, in words.
    pub why: String,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {} ({})", self.setting, self.value, self.why)
    }
}

/// Rule 1: tokens per packed micro-batch: [`epoch_share`] within the longest sample,
/// [`MAX_AUTO_BATCH_TOKENS`] and `gpu_most`, the most the GPU trains in one pass.
pub fn batch_tokens(shape: DataShape, gpu_most: usize) -> usize {
    epoch_share(shape.tokens).min(MAX_AUTO_BATCH_TOKENS).min(gpu_most).max(shape.longest)
}

/// An epoch's training tokens over [`BATCHES_PER_EPOCH`] steps, rounded up to a multiple of 64.
pub fn epoch_share(tokens: usize) -> usize {
    tokens.div_ceil(BATCHES_PER_EPOCH).div_ceil(64) * 64
}

/// Rule 2: epochs, given the optimizer steps one epoch takes.
pub fn epochs(steps_per_epoch: u64) -> u64 {
    MIN_AUTO_STEPS.div_ceil(steps_per_epoch.max(1)).clamp(DEFAULT_EPOCHS, MAX_AUTO_EPOCHS)
}

/// The product `scale · r` that the weights' change per Adam step grows with.
pub fn scale_times_rank(lora: &LoraConfig) -> f32 {
    lora.scale() * lora.r as f32
}

/// Rule 3: the peak learning rate of a supervised run of `total_steps` optimizer steps with
/// `lora` (times `factor`: 1, or [`DPO_LR_FACTOR`] for DPO), to three significant digits.
pub fn learning_rate(total_steps: u64, lora: &LoraConfig, factor: f32) -> f32 {
    let short = (LONG_RUN_STEPS as f64 / total_steps.max(1) as f64).clamp(1.0, f64::from(MAX_SHORT_RUN_FACTOR));
    let lr = f64::from(BASE_LR) * short * f64::from(REFERENCE_SCALE_TIMES_RANK) / f64::from(scale_times_rank(lora))
        * f64::from(factor);
    // Three significant digits, so the value reads (and records) as 4e-3, not 3.9999997e-3.
    let digits = 10f64.powi(2 - lr.log10().floor() as i32);
    ((lr * digits).round() / digits) as f32
}

/// Rule 4: warmup steps of a run of `total_steps`.
pub fn warmup_steps(total_steps: u64) -> u64 {
    (total_steps as f64 * WARMUP_FRACTION).floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_keeps_the_weight_step_across_ranks() {
        let lr =
            |r, alpha, use_rslora| learning_rate(1000, &LoraConfig { r, alpha, use_rslora, ..Default::default() }, 1.0);
        assert_eq!(lr(16, 32.0, false), BASE_LR);
        // Plain LoRA: the step grows with alpha alone, so r 8 with the same alpha keeps the rate.
        assert_eq!(lr(8, 32.0, false), BASE_LR);
        assert_eq!(lr(8, 16.0, false), 2.0 * BASE_LR);
        // rsLoRA: alpha · sqrt(r) = 32 · 4 = 128, four times the reference.
        assert!((lr(16, 32.0, true) - BASE_LR / 4.0).abs() < 1e-9);
    }

    #[test]
    fn dpo_takes_a_tenth_of_the_supervised_rate_rounded_as_it_is() {
        let lora = LoraConfig::default();
        // 24 steps: the short-run factor is capped at 20, 4e-3 supervised and 4e-4 for DPO.
        assert_eq!(learning_rate(24, &lora, 1.0), 4e-3);
        assert_eq!(learning_rate(24, &lora, DPO_LR_FACTOR), 4e-4);
        // Rounded after the factor: 2e-4 * 720 / 700 / 10 reads 2.06e-5, not 2.0571428e-5.
        assert_eq!(learning_rate(700, &lora, DPO_LR_FACTOR), 2.06e-5);
    }
}
