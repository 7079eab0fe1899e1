//! Preference training (DPO) settings, and the reward metrics a step reports, as TRL's
//! DPOTrainer names and computes them.
//!
//! The reference is the adapter training starts from, frozen: the base model for a new adapter
//! (its B matrices are zero, so it adds exactly nothing), or the SFT adapter a run continues
//! from, as TRL does with a PEFT model (a "ref" copy of the starting adapter). The base weights
//! are shared, so the reference costs no second copy of the model.

use serde::{Deserialize, Serialize};

use crate::gpu::launch::{DPO_STATS, DpoLoss};

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning: the loss of the trained tokens (assistant turns).
    #[default]
    Sft,
    /// Direct preference optimization over preference pairs (`prompt`, `chosen`, `rejected`).
    Dpo,
}

impl std::str::FromStr for Method {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "sft" => Ok(Method::Sft),
            "dpo" => Ok(Method::Dpo),
            other => Err(crate::Error::invalid("method", format!("`{other}` (expected sft or dpo)"))),
        }
    }
}

/// TRL's DPO losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossKind {
    /// `-log sigmoid(beta h)`, h the chosen log-ratio minus the rejected one (the DPO paper);
    /// with `label_smoothing` e, conservative DPO (cDPO):
    /// `-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)`, as TRL before 1.0 computed the
    /// sigmoid loss with label smoothing.
    #[default]
    Sigmoid,
    /// Robust DPO: labels flipped with probability `label_smoothing`,
    /// `(-(1-e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)`.
    Robust,
    /// IPO: `(h - 1 / (2 beta))^2` with each log-ratio averaged over its completion's tokens.
    Ipo,
}

impl std::str::FromStr for DpoLossKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "sigmoid" => Ok(DpoLossKind::Sigmoid),
            "robust" => Ok(DpoLossKind::Robust),
            "ipo" => Ok(DpoLossKind::Ipo),
            other => Err(crate::Error::invalid("DPO loss", format!("`{other}` (expected sigmoid, robust or ipo)"))),
        }
    }
}

/// Where the reference's log-probabilities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoReference {
    /// Once, before training (TRL's `precompute_ref_log_probs`): a forward pass over the data
    /// with the starting adapter, 8 bytes a pair kept on the host.
    Precomputed,
    /// In every step: a forward pass with a frozen copy of the starting adapter on the GPU.
    InStep,
}

impl std::str::FromStr for DpoReference {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "precomputed" => Ok(DpoReference::Precomputed),
            "in_step" => Ok(DpoReference::InStep),
            other => {
                Err(crate::Error::invalid("DPO reference", format!("`{other}` (expected precomputed or in_step)")))
            }
        }
    }
}

/// DPO's settings (`TrainConfig::dpo`; used with `method = "dpo"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// How far the policy may move from the reference: higher keeps it closer (IPO's tau).
    pub beta: f32,
    /// The loss.
    pub loss: DpoLossKind,
    /// The probability that a pair's preference is flipped, in [0, 0.5): conservative DPO with
    /// `loss = "sigmoid"`, robust DPO with `loss = "robust"`; IPO takes none.
    pub label_smoothing: f32,
    /// Where the reference comes from. Unset: precomputed (see [`DpoConfig::reference_choice`]).
    pub reference: Option<DpoReference>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, loss: DpoLossKind::Sigmoid, label_smoothing: 0.0, reference: None }
    }
}

impl DpoConfig {
    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.beta.is_finite() && self.beta > 0.0) {
            p.push(format!("beta must be a finite number > 0 (got {})", self.beta));
        }
        let e = self.label_smoothing;
        match self.loss {
            DpoLossKind::Sigmoid | DpoLossKind::Robust if !(0.0..0.5).contains(&e) => {
                p.push(format!("label_smoothing must be in [0, 0.5) (got {e})"));
            }
            DpoLossKind::Ipo if e != 0.0 => p.push(format!(
                "label_smoothing = {e} does not apply to loss = \"ipo\"; use loss = \"sigmoid\" (conservative DPO) \
                 or \"robust\", or label_smoothing = 0"
            )),
            _ => {}
        }
        p
    }

    /// The loss as the kernel computes it.
    pub fn kernel_loss(&self) -> DpoLoss {
        let (beta, e) = (self.beta, self.label_smoothing);
        match self.loss {
            DpoLossKind::Sigmoid => DpoLoss { beta, a: 1.0 - e, b: e, ipo: false, length_normalized: false },
            DpoLossKind::Robust => DpoLoss {
                beta,
                a: (1.0 - e) / (1.0 - 2.0 * e),
                b: -e / (1.0 - 2.0 * e),
                ipo: false,
                length_normalized: false,
            },
            DpoLossKind::Ipo => DpoLoss { beta, a: 0.0, b: 0.0, ipo: true, length_normalized: true },
        }
    }

    /// The reference's source, set or chosen, and why.
    pub fn reference_choice(&self) -> (DpoReference, String) {
        match self.reference {
            Some(r) => (r, "set".into()),
            None => (
                DpoReference::Precomputed,
                "the reference (the starting adapter, frozen) never changes, so its log-probabilities are computed \
                 once before training: 8 bytes a pair, and no forward pass in the steps"
                    .into(),
            ),
        }
    }
}

/// A step's or an evaluation's reward metrics, means over its pairs (TRL's `rewards/*` and
/// `logps/*`): a reward is beta times the log-ratio of the policy to the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rewards {
    /// `rewards/chosen`.
    pub chosen: f32,
    /// `rewards/rejected`.
    pub rejected: f32,
    /// `rewards/margins`: chosen minus rejected.
    pub margins: f32,
    /// `rewards/accuracies`: the share of pairs whose chosen reward is the higher.
    pub accuracies: f32,
    /// `logps/chosen`: the chosen completions' log-probability under the policy.
    pub logps_chosen: f32,
    /// `logps/rejected`.
    pub logps_rejected: f32,
}

impl Rewards {
    /// The means over pairs of `stats` ([`DPO_STATS`] floats a pair, as `dpo.wgsl` writes
    /// them), with the mean loss.
    pub fn of(stats: &[f32]) -> (f32, Rewards) {
        let n = (stats.len() / DPO_STATS).max(1) as f64;
        let mean = |f: &dyn Fn(&[f32]) -> f64| (stats.chunks(DPO_STATS).map(f).sum::<f64>() / n) as f32;
        let loss = mean(&|p| f64::from(p[0]));
        let r = Rewards {
            chosen: mean(&|p| f64::from(p[1])),
            rejected: mean(&|p| f64::from(p[2])),
            margins: mean(&|p| f64::from(p[1] - p[2])),
            accuracies: mean(&|p| f64::from(u8::from(p[1] > p[2]))),
            logps_chosen: mean(&|p| f64::from(p[3])),
            logps_rejected: mean(&|p| f64::from(p[4])),
        };
        (loss, r)
    }
}
