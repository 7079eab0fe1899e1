//! Training checkpoints: one safetensors file holding the adapter's flat parameters, AdamW's
//! moments and (with evaluation) the best parameters so far, with the trainer's state in the
//! metadata: step, AdamW's update count, the data cursor and the shuffling RNG, the evaluation
//! history, the LoRA configuration and fingerprints of the model and of the training plan.
//!
//! The file is written atomically (temporary file, then rename), so a crash or a full disk
//! leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::atomic::{previous, write_atomic_keeping_previous};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::safetensors_write::{Entry, header};

/// Written into every checkpoint; a file without it is not an edgetune checkpoint.
pub const FORMAT: &str = "edgetune-checkpoint-1";

/// Where training stands: everything besides the tensors that resuming needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken (good or skipped).
    pub step: u64,
    /// AdamW updates applied (its t); less than `step` when non-finite steps were skipped.
    pub updates: u32,
    /// Epoch in progress (0-based) and the next step within it.
    pub epoch: u64,
    /// Optimizer steps taken in the current epoch.
    pub step_in_epoch: u64,
    /// State of the RNG that shuffles batches, as it was at the start of the current epoch.
    pub epoch_rng: u64,
    /// Consecutive steps with a non-finite loss or gradient.
    pub bad_steps: u32,
    /// Best validation loss so far, and evaluations since it improved.
    pub best_val_loss: Option<f32>,
    /// Evaluations since the best validation loss (early stopping's count).
    pub evals_since_best: u32,
    /// Tokens seen by the optimizer so far.
    pub tokens: u64,
    /// The step of the best validation loss, and the mean training loss over the steps before
    /// that evaluation (since the one before it).
    #[serde(default)]
    pub best_step: u64,
    /// The mean training loss over the steps before the best evaluation (since the one before).
    #[serde(default)]
    pub train_loss_at_best: Option<f32>,
    /// Sum and count of the training losses since the last evaluation.
    #[serde(default)]
    pub window: (f64, u64),
    /// Whether the warning for a validation loss that rises as the training loss falls was given.
    #[serde(default)]
    pub diverge_warned: bool,
}

impl TrainState {
    /// Mean training loss since the last evaluation.
    pub fn window_loss(&self) -> Option<f32> {
        (self.window.1 > 0).then(|| (self.window.0 / self.window.1 as f64) as f32)
    }
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Where the run was: steps, epoch, shuffling, validation.
    pub state: TrainState,
    /// The adapter's configuration.
    pub lora: LoraConfig,
    /// [`crate::model::llama::Model::fingerprint`] of the model trained.
    pub model_fingerprint: u64,
    /// A hash of the training samples and of the settings that decide the batches.
    pub plan_fingerprint: u64,
    /// The adapter's parameters (A and B of every adapted module, in layout order).
    pub params: Vec<f32>,
    /// AdamW's first moments, one per parameter.
    pub m: Vec<f32>,
    /// AdamW's second moments, one per parameter.
    pub v: Vec<f32>,
    /// The parameters at the best validation loss, when `keep_best` keeps them.
    pub best: Option<Vec<f32>>,
}

/// A safetensors file of 1-D F32 tensors with string metadata, laid out as the safetensors crate
/// lays it out but with the metadata's keys in sorted order (see
/// [`crate::safetensors_write::header`]), so that the same checkpoint saved twice is the same
/// bytes.
fn safetensors_bytes(tensors: &[(&str, &[f32])], meta: &BTreeMap<&str, String>) -> Result<Vec<u8>> {
    let lens: Vec<[usize; 1]> = tensors.iter().map(|(_, v)| [v.len()]).collect();
    let entries: Vec<Entry<'_>> =
        tensors.iter().zip(&lens).map(|((name, _), len)| Entry { name, dtype: Dtype::F32, shape: len }).collect();
    let (mut out, order) = header(&entries, meta)?;
    out.reserve(entries.iter().map(Entry::bytes).sum());
    for i in order {
        out.extend(tensors[i].1.iter().flat_map(|x| x.to_le_bytes()));
    }
    Ok(out)
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid("checkpoint", format!("serializing state: {e}")))
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically, keeping the one it replaces as
    /// [`previous`]`(path)` (see [`Checkpoint::load_or_previous`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(&str, &[f32])> = vec![("params", &self.params), ("adam_m", &self.m), ("adam_v", &self.v)];
        if let Some(b) = &self.best {
            tensors.push(("best_params", b));
        }
        let meta = BTreeMap::from([
            ("format", FORMAT.to_string()),
            ("state", json(&self.state)?),
            ("lora", json(&self.lora)?),
            ("model_fingerprint", format!("{:016x}", self.model_fingerprint)),
            ("plan_fingerprint", format!("{:016x}", self.plan_fingerprint)),
        ]);
        let data = safetensors_bytes(&tensors, &meta)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic_keeping_previous(path, &data)
    }

    /// Reads the checkpoint at `path`, or, when that one is missing, truncated or corrupt, the
    /// one it replaced ([`previous`]`(path)`), with a warning that says so. Both bad is an error
    /// that names both.
    pub fn load_or_previous(path: &Path) -> Result<(Self, Option<String>)> {
        let latest = match Self::load(path) {
            Ok(ck) => return Ok((ck, None)),
            Err(e) => e,
        };
        let prev = previous(path);
        if !prev.exists() {
            return Err(latest);
        }
        match Self::load(&prev) {
            Ok(ck) => {
                let warning = format!(
                    "{latest}; resuming from the checkpoint before it, {} (step {}): the steps after it are done again",
                    prev.display(),
                    ck.state.step
                );
                Ok((ck, Some(warning)))
            }
            Err(e) => Err(Error::format(path, format!("{latest}; and the checkpoint before it: {e}"))),
        }
    }

    /// Reads a checkpoint; every missing or malformed part is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::map(path)?;
        let bad = |what: String| Error::format(path, what);
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a checkpoint (not a safetensors file: {e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| meta.get(key).ok_or_else(|| bad(format!("not an edgetune checkpoint (no `{key}`)")));
        if field("format")? != FORMAT {
            return Err(bad(format!("checkpoint format `{}` (expected `{FORMAT}`)", field("format")?)));
        }
        let state: TrainState =
            serde_json::from_str(field("state")?).map_err(|e| bad(format!("checkpoint field `state`: {e}")))?;
        let lora: LoraConfig =
            serde_json::from_str(field("lora")?).map_err(|e| bad(format!("checkpoint field `lora`: {e}")))?;
        let hex = |key: &str| -> Result<u64> {
            u64::from_str_radix(field(key)?, 16).map_err(|e| bad(format!("checkpoint field `{key}`: {e}")))
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("checkpoint tensors: {e}")))?;
        let read = |name: &str| -> Result<Option<Vec<f32>>> {
            let Ok(t) = st.tensor(name) else { return Ok(None) };
            if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
                return Err(bad(format!(
                    "checkpoint tensor `{name}` is {:?} {:?}, expected F32 [n]",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(Some(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        };
        let need = |name: &str| read(name)?.ok_or_else(|| bad(format!("checkpoint tensor `{name}` is missing")));
        let ck = Checkpoint {
            state,
            lora,
            model_fingerprint: hex("model_fingerprint")?,
            plan_fingerprint: hex("plan_fingerprint")?,
            params: need("params")?,
            m: need("adam_m")?,
            v: need("adam_v")?,
            best: read("best_params")?,
        };
        let n = ck.params.len();
        if ck.m.len() != n || ck.v.len() != n || ck.best.as_ref().is_some_and(|b| b.len() != n) {
            return Err(bad(format!("checkpoint tensors disagree in length (params has {n})")));
        }
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A checkpoint reads back exactly what was written, the floats of its state (the training
    /// loss sum of the window, the best validation loss) bit for bit: a resumed run carries on
    /// from the very numbers the uninterrupted run had.
    #[test]
    fn a_checkpoint_reads_back_its_state_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("edgetune-checkpoint-{}", std::process::id()));
        let path = dir.join("ck.safetensors");
        let mut rng = crate::prim::Rng::new(51);
        let mut next = || (u64::from(rng.next_u32()) << 32) | u64::from(rng.next_u32());
        for _ in 0..200 {
            // Sums of losses as a window holds them: tens to hundreds, all 52 mantissa bits used.
            let sum = 1.0 + (next() >> 11) as f64 / (1u64 << 53) as f64 * 500.0;
            let best = f32::from_bits(0x3f80_0000 | (next() as u32 >> 9)) * 4.0;
            let state = TrainState {
                step: next() % 1000,
                window: (sum, next() % 100),
                best_val_loss: Some(best),
                train_loss_at_best: Some(best * 1.25),
                ..TrainState::default()
            };
            let ck = Checkpoint {
                state,
                lora: LoraConfig::default(),
                model_fingerprint: next(),
                plan_fingerprint: next(),
                params: vec![1.0, -2.5],
                m: vec![0.0; 2],
                v: vec![0.0; 2],
                best: None,
            };
            ck.save(&path).expect("save");
            let back = Checkpoint::load(&path).expect("load");
            assert_eq!(
                back.state.window.0.to_bits(),
                sum.to_bits(),
                "window sum {sum:e} read back as {:e}",
                back.state.window.0
            );
            assert_eq!(back, ck);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn example() -> Checkpoint {
        Checkpoint {
            state: TrainState { step: 7, window: (12.5, 3), best_val_loss: Some(2.25), ..TrainState::default() },
            lora: LoraConfig::default(),
            model_fingerprint: 0x0123_4567_89ab_cdef,
            plan_fingerprint: 42,
            params: vec![1.0, -2.5, 3.0e-8],
            m: vec![0.5; 3],
            v: vec![0.25; 3],
            best: Some(vec![1.0, -2.0, 0.0]),
        }
    }

    /// The same checkpoint saved again is the same bytes (each save's metadata map would
    /// otherwise come out in another order), and it reads back as itself.
    #[test]
    fn the_same_checkpoint_is_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("edgetune-checkpoint-bytes-{}", std::process::id()));
        let path = dir.join("ck.safetensors");
        let ck = example();
        let mut first = None;
        for i in 0..16 {
            ck.save(&path).expect("save");
            let bytes = std::fs::read(&path).expect("read");
            let first = first.get_or_insert_with(|| bytes.clone());
            assert!(bytes == *first, "save {i} wrote other bytes than the first");
            assert_eq!(Checkpoint::load(&path).expect("load"), ck);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The file is laid out exactly as the safetensors crate lays out the same tensors (compared
    /// where its output is deterministic: one metadata key), tensors given in any order.
    #[test]
    fn the_layout_is_the_one_the_safetensors_crate_writes() {
        let (a, b, c) = (vec![1.0f32, 2.0, -3.0], vec![0.125f32; 5], Vec::<f32>::new());
        let tensors: Vec<(&str, &[f32])> = vec![("zeta", &a), ("alpha", &b), ("mid", &c)];
        let meta = BTreeMap::from([("format", "pt".to_string())]);
        let ours = safetensors_bytes(&tensors, &meta).expect("ours");
        let bytes: Vec<Vec<u8>> =
            tensors.iter().map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = tensors.iter().zip(&bytes).map(|((name, v), b)| {
            (name.to_string(), safetensors::tensor::TensorView::new(Dtype::F32, vec![v.len()], b).expect("view"))
        });
        let theirs =
            safetensors::tensor::serialize(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])))
                .expect("theirs");
        assert_eq!(String::from_utf8_lossy(&ours[8..]), String::from_utf8_lossy(&theirs[8..]));
        assert!(ours == theirs, "same header, other bytes");
    }
}
