//! What a run will train, decided before anything touches the GPU: the settings chosen from the
//! data, the draws of the training samples packed into batches, and which batches each optimizer
//! step takes. [`super::Trainer`] trains exactly this plan, and `edgetune export-job` writes it
//! out for other trainers.

use super::TrainConfig;
use super::auto::{self, Choice, DataShape};
use super::dpo::Method;
use crate::data::{self, Dataset, Sample, ValSource, Validation};
use crate::error::{Error, Result};
use crate::prim::Rng;

/// Where the epoch-order RNG starts for a seed.
const EPOCH_RNG_SALT: u64 = 0x5eed_0fba_7c4e_5eed;

/// One draw of the training samples: shuffled, then cut into packed batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// The samples in their shuffled order.
    pub samples: Vec<Sample>,
    /// Each batch's samples, as indices into `samples`, in order.
    pub batches: Vec<Vec<usize>>,
}

impl Round {
    /// The samples of batch `b`, in the order they are laid end to end.
    pub fn batch(&self, b: usize) -> impl Iterator<Item = &Sample> {
        self.batches[b].iter().map(|&i| &self.samples[i])
    }
}

/// One optimizer step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// 0-based epoch.
    pub epoch: u64,
    /// The draw the epoch trains ([`RunPlan::rounds`]).
    pub round: usize,
    /// The batches of that draw whose gradients the step sums (up to `grad_accum`).
    pub batches: Vec<usize>,
}

/// The settings a run uses, automatic ones resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Resolved {
    pub(crate) learning_rate: f32,
    pub(crate) warmup_steps: u64,
    pub(crate) total_steps: u64,
    pub(crate) keep_best: bool,
}

/// What the model that trains a plan can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Tokens of the model's context: a longer sample is refused, and conversations that reach
    /// past it are trained a record at a time.
    pub max_context: usize,
    /// Tokens one training batch can hold on the GPU that trains it
    /// ([`crate::model::llama::Model::max_batch_tokens`]): the automatic `batch_tokens` stays
    /// within it, and a longer sample is refused.
    pub max_batch_tokens: usize,
}

impl ModelLimits {
    /// A model of `max_context` tokens, its batches bounded by nothing else: a job for another
    /// trainer, on a GPU this process does not see.
    pub fn context(max_context: usize) -> Self {
        ModelLimits { max_context, max_batch_tokens: usize::MAX }
    }
}

/// A run's plan: see the module's documentation.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The configuration with every automatic choice filled in.
    pub config: TrainConfig,
    /// The automatic choices, with their reasons.
    pub chosen: Vec<Choice>,
    /// The draws of the training data (one unless records are chained: see
    /// [`Dataset::rounds`]); epoch e trains draw e mod their number, and every draw has as many
    /// batches.
    pub rounds: Vec<Round>,
    /// The validation samples, in batches of the same size.
    pub val: Round,
    pub(crate) resolved: Resolved,
}

impl RunPlan {
    /// Plans training on `dataset` with `cfg` (its adapter settings final) for a model within
    /// `limits`. Settings left unset are chosen from the data ([`auto`]).
    pub fn new(dataset: &Dataset, mut cfg: TrainConfig, limits: ModelLimits) -> Result<RunPlan> {
        let ModelLimits { max_context, max_batch_tokens: gpu_most } = limits;
        cfg.validate()?;
        if dataset.train.is_empty() {
            return Err(Error::invalid("dataset", "has no training samples"));
        }
        check_method(dataset, cfg.method)?;
        // Chained conversations (see `DataConfig::chain`), unless the rule chose them and they
        // do not fit the model's context, or one pass of its GPU: then each record alone.
        let chaining = &dataset.report.chaining;
        let longest_chain = dataset.rounds.iter().flatten().map(|s| s.ids.len()).max().unwrap_or(0);
        let too_long = chaining.automatic && longest_chain > max_context.min(gpu_most);
        let (draws, chain, chain_why): (Vec<&[Sample]>, usize, String) = if dataset.rounds.is_empty() || too_long {
            let why = if too_long {
                let over = if longest_chain > max_context {
                    format!("the model's context of {max_context}")
                } else {
                    format!("the {gpu_most} this GPU trains in one pass")
                };
                format!(
                    "each record is trained alone (automatic: conversations of {} records reach {longest_chain} \
                     tokens, over {over})",
                    chaining.records
                )
            } else {
                chaining.why.clone()
            };
            (vec![&dataset.train], 1, why)
        } else {
            (dataset.rounds.iter().map(Vec::as_slice).collect(), chaining.records, chaining.why.clone())
        };
        let shape = DataShape {
            samples: draws[0].len(),
            tokens: draws[0].iter().map(|s| s.ids.len()).sum(),
            longest: draws.iter().flat_map(|d| d.iter()).map(|s| s.ids.len()).max().unwrap_or(0),
        };
        if let Some(b) = cfg.batch_tokens
            && shape.longest > b
        {
            return Err(Error::invalid(
                "batch_tokens",
                format!(
                    "{b} is less than the longest sample ({} tokens); raise it, lower data.max_len, or leave \
                     batch_tokens unset to choose it from the data",
                    shape.longest
                ),
            ));
        }
        let all = || draws.iter().flat_map(|d| d.iter()).chain(&dataset.val);
        data::check_context(all(), max_context, "data.max_len")?;
        let longest = all().map(|s| s.ids.len()).max().unwrap_or(0);
        if longest > gpu_most {
            return Err(Error::invalid(
                "data.max_len",
                format!(
                    "the longest sample has {longest} tokens, more than this GPU trains in one pass ({gpu_most}: \
                     grids of 65,535 workgroups, bindings of max_storage_buffer_binding_size); lower data.max_len \
                     to at most {gpu_most}"
                ),
            ));
        }
        let mut chosen = Vec::new();
        if chaining.automatic {
            chosen.push(choice("data.chain", chain, chain_why));
        }
        cfg.data.chain = Some(chain);
        let batch_tokens = cfg.batch_tokens.unwrap_or_else(|| {
            let b = auto::batch_tokens(shape, gpu_most);
            let (per_epoch, most) = (auto::BATCHES_PER_EPOCH, auto::MAX_AUTO_BATCH_TOKENS);
            let share = auto::epoch_share(shape.tokens);
            let split = format!("{} training tokens over about {per_epoch} steps an epoch", shape.tokens);
            let would = format!("{split} would be {share} tokens a step, rounded up to 64");
            let why = if b == share {
                format!("{split}, rounded up to 64, within the longest sample ({}) and {most}", shape.longest)
            } else if b == shape.longest {
                format!("the longest sample: {would}")
            } else if b < most {
                format!(
                    "the most this GPU trains in one pass (grids of 65,535 workgroups, bindings of \
                     max_storage_buffer_binding_size): {would}"
                )
            } else {
                format!("at most {most}: {would}")
            };
            chosen.push(choice("batch_tokens", b, why));
            b
        });
        cfg.batch_tokens = Some(batch_tokens);
        // Shuffle once so that batches mix samples, then pack: the batch count is then fixed,
        // and so is the number of steps the schedule spans.
        let rounds = draw_rounds(&draws, batch_tokens, cfg.seed);
        let val_refs: Vec<&Sample> = dataset.val.iter().collect();
        let val = Round { samples: dataset.val.clone(), batches: data::pack(&val_refs, batch_tokens) };
        let resolved = resolve(&mut cfg, &mut chosen, rounds[0].batches.len(), &dataset.report.validation);
        Ok(RunPlan { config: cfg, chosen, rounds, val, resolved })
    }

    /// Optimizer steps the run takes when it completes.
    pub fn total_steps(&self) -> u64 {
        self.resolved.total_steps
    }

    /// Packed batches in one pass over the training samples.
    pub fn batches_per_epoch(&self) -> usize {
        self.rounds[0].batches.len()
    }

    /// Optimizer steps in one epoch (the last may sum fewer than `grad_accum` batches).
    pub fn steps_per_epoch(&self) -> u64 {
        self.batches_per_epoch().div_ceil(self.config.grad_accum) as u64
    }

    /// The peak learning rate.
    pub fn learning_rate(&self) -> f32 {
        self.resolved.learning_rate
    }

    /// Steps of linear warmup.
    pub fn warmup_steps(&self) -> u64 {
        self.resolved.warmup_steps
    }

    /// Whether the adapter with the best validation loss is returned rather than the last.
    pub fn keep_best(&self) -> bool {
        self.resolved.keep_best
    }

    /// Every step of the run, in order: the batches the trainer sums in each.
    pub fn steps(&self) -> Vec<PlannedStep> {
        let (n, accum) = (self.batches_per_epoch(), self.config.grad_accum);
        let mut rng = initial_epoch_rng(self.config.seed);
        let mut out = Vec::with_capacity(self.total_steps() as usize);
        let mut epoch = 0u64;
        'epochs: loop {
            let order = epoch_order(rng, n);
            for group in order.chunks(accum) {
                if out.len() as u64 >= self.total_steps() {
                    break 'epochs;
                }
                let round = epoch as usize % self.rounds.len();
                out.push(PlannedStep { epoch, round, batches: group.to_vec() });
            }
            rng = next_epoch_rng(rng, n);
            epoch += 1;
        }
        out
    }
}

/// The epoch-order RNG's state at the start of the first epoch.
pub(crate) fn initial_epoch_rng(seed: u64) -> u64 {
    Rng::new(seed ^ EPOCH_RNG_SALT).state()
}

/// The order in which an epoch that starts with RNG state `state` visits its `n` batches.
pub(crate) fn epoch_order(state: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::from_state(state).shuffle(&mut order);
    order
}

/// The RNG state of the epoch after one that started with `state`.
pub(crate) fn next_epoch_rng(state: u64, n: usize) -> u64 {
    let mut rng = Rng::from_state(state);
    rng.shuffle(&mut (0..n).collect::<Vec<_>>());
    rng.state()
}

fn check_method(dataset: &Dataset, method: Method) -> Result<()> {
    let pairs = dataset.train.iter().chain(&dataset.val).filter(|s| s.rejected_at.is_some()).count();
    let all = dataset.train.len() + dataset.val.len();
    match method {
        Method::Sft if pairs > 0 => Err(Error::invalid(
            "method",
            "the data holds preference pairs (prompt, chosen, rejected): train them with method = \"dpo\"",
        )),
        Method::Dpo if pairs < all => {
            let s = dataset.train.iter().chain(&dataset.val).find(|s| s.rejected_at.is_none());
            let at = s.map(|s| format!(" ({}:{})", s.file.display(), s.line)).unwrap_or_default();
            Err(Error::invalid(
                "method",
                format!(
                    "DPO trains on preference pairs (prompt, chosen, rejected), and {} of {all} samples are not{at}",
                    all - pairs
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Each draw's samples shuffled with `seed` and packed: the first draw by `capacity` tokens, the
/// others into as many batches of the same sample counts, so that every epoch takes as many
/// steps.
fn draw_rounds(draws: &[&[Sample]], capacity: usize, seed: u64) -> Vec<Round> {
    let mut sizes: Option<Vec<usize>> = None;
    let mut out = Vec::with_capacity(draws.len());
    for draw in draws {
        let mut samples: Vec<Sample> = draw.to_vec();
        Rng::new(seed).shuffle(&mut samples);
        let batches = match &sizes {
            None => data::pack(&samples.iter().collect::<Vec<_>>(), capacity),
            Some(sizes) => {
                let mut next = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        next += n;
                        (next - n..next.min(samples.len())).collect()
                    })
                    .collect()
            }
        };
        sizes.get_or_insert_with(|| batches.iter().map(Vec::len).collect());
        out.push(Round { samples, batches });
    }
    out
}

pub(crate) fn choice(setting: &str, value: impl ToString, why: String) -> Choice {
    Choice { setting: setting.into(), value: value.to_string(), why }
}

/// Fills in the settings `cfg` leaves unset (rules 2 to 5 of [`auto`]; `batch_tokens` is set
/// already), recording each choice.
fn resolve(cfg: &mut TrainConfig, chosen: &mut Vec<Choice>, batches: usize, validation: &Validation) -> Resolved {
    let source = serde_json::to_value(validation.source).ok().and_then(|v| v.as_str().map(String::from));
    chosen.push(choice("validation", source.unwrap_or_default(), validation.why.clone()));
    let per_epoch = batches.div_ceil(cfg.grad_accum) as u64;
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => {
            let epochs = *cfg.epochs.get_or_insert_with(|| {
                let e = auto::epochs(per_epoch);
                chosen.push(choice(
                    "epochs",
                    e,
                    format!(
                        "{e} x {per_epoch} steps = {} steps: at least {} steps, {} to {} epochs",
                        e * per_epoch,
                        auto::MIN_AUTO_STEPS,
                        auto::DEFAULT_EPOCHS,
                        auto::MAX_AUTO_EPOCHS
                    ),
                ));
                e
            });
            epochs * per_epoch
        }
    };
    let (lora, method) = (cfg.lora.clone(), cfg.method);
    let learning_rate = *cfg.learning_rate.get_or_insert_with(|| {
        let factor = if method == Method::Dpo { auto::DPO_LR_FACTOR } else { 1.0 };
        let lr = auto::learning_rate(total_steps, &lora, factor);
        let dpo = if method == Method::Dpo { format!(", times {factor} for DPO") } else { String::new() };
        chosen.push(choice(
            "learning_rate",
            format!("{lr:e}"),
            format!(
                "{:e} for r 16, alpha 32 over at least {} steps, raised for this run's {total_steps} steps and \
                 scaled by 32 / (scale x r = {}){dpo}",
                auto::BASE_LR,
                auto::LONG_RUN_STEPS,
                auto::scale_times_rank(&lora)
            ),
        ));
        lr
    });
    let warmup_steps = *cfg.warmup_steps.get_or_insert_with(|| {
        let w = auto::warmup_steps(total_steps);
        chosen.push(choice(
            "warmup_steps",
            w,
            format!("{}% of {total_steps} steps, rounded down", auto::WARMUP_FRACTION * 100.0),
        ));
        w
    });
    let keep_best = *cfg.keep_best.get_or_insert_with(|| {
        let why = if validation.meaningful {
            "the validation loss is meaningful, so the adapter with the lowest one is returned".to_string()
        } else if validation.source == ValSource::None {
            "no validation samples: the final adapter is returned".to_string()
        } else {
            "held-out samples chosen at random from a small set may state what no training sample does, so the \
             final adapter is returned"
                .to_string()
        };
        chosen.push(choice("keep_best", validation.meaningful, why));
        validation.meaningful
    });
    Resolved { learning_rate, warmup_steps, total_steps, keep_best }
}
