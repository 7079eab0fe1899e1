//! Learning-rate schedules with linear warmup, as transformers' `get_*_schedule_with_warmup`
//! define them: the factor for optimizer step `step` (0-based: the first update uses step 0)
//! multiplies the peak learning rate.

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate after the warmup, to the end.
    Constant,
    /// Down in a straight line to 0 at the last step.
    Linear,
    /// Down along half a cosine to 0 at the last step.
    #[default]
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => {
                Err(crate::Error::invalid("lr schedule", format!("`{other}` (expected constant, linear or cosine)")))
            }
        }
    }
}

/// A schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The shape after the warmup.
    pub kind: ScheduleKind,
    /// The rate at the end of the warmup.
    pub peak_lr: f32,
    /// Steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// The run's length.
    pub total_steps: u64,
}

impl Schedule {
    /// The factor for 0-based optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of 0-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f32 {
        (f64::from(self.peak_lr) * self.factor(step)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from transformers' definitions (optimization.py), worked by hand.
    #[test]
    fn warmup_then_decay_as_transformers_defines_it() {
        let s = |kind| Schedule { kind, peak_lr: 1.0, warmup_steps: 2, total_steps: 10 };
        let c = s(ScheduleKind::Constant);
        assert_eq!([c.lr(0), c.lr(1), c.lr(2), c.lr(9)], [0.0, 0.5, 1.0, 1.0]);
        let l = s(ScheduleKind::Linear);
        assert_eq!([l.lr(0), l.lr(1), l.lr(2), l.lr(6), l.lr(10), l.lr(12)], [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]);
        let k = s(ScheduleKind::Cosine);
        assert_eq!([k.lr(1), k.lr(2), k.lr(10)], [0.5, 1.0, 0.0]);
        assert!((k.lr(6) - 0.5).abs() < 1e-7, "half way is half the peak: {}", k.lr(6));
        let no_warmup = Schedule { kind: ScheduleKind::Linear, peak_lr: 2.0, warmup_steps: 0, total_steps: 4 };
        assert_eq!(no_warmup.lr(0), 2.0, "without warmup the first step uses the peak");
    }
}
