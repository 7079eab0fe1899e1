//! Training: the loop ([`trainer`]), checkpoints, the optimizer over the flat LoRA buffers and
//! the learning-rate schedules.

pub mod answers;
pub mod auto;
pub mod checkpoint;
pub mod dpo;
pub mod jobs;
pub mod optimizer;
pub mod plan;
pub mod schedule;
pub mod trainer;

pub use crate::model::training::Precision;
pub use answers::{AnswerEval, EvalAnswers};
pub use auto::Choice;
pub use dpo::{DpoConfig, DpoLossKind, DpoReference, Method, Rewards};
pub use plan::{ModelLimits, PlannedStep, Round, RunPlan};
pub use trainer::{CancelToken, Event, Outcome, StopReason, TrainConfig, Trainer, TrainingBytes};
