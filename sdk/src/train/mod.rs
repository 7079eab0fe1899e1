//! Training: the optimizer over the flat LoRA buffers and the learning-rate schedules.
pub mod optimizer;
pub mod schedule;
