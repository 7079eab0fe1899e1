//! Tensor sources: a Hugging Face folder of safetensors (single or sharded) or a GGUF file.
//!
//! Callers ask for tensors by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`)
//! and get f32 values in PyTorch's row-major layout, whatever the file stores. For GGUF llama
//! files the q/k row permutation that llama.cpp applies is undone here, so the rest of edgetune
//! sees one layout.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgufFile;
use crate::prim::{FNV_OFFSET, fnv1a};
use crate::quant::gguf_blocks::GgmlType;

/// One memory-mapped safetensors file with its header parsed (and validated) once.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    metadata: Metadata,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let mmap = crate::files::map(&path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(Shard { path, mmap, metadata, data_start: 8 + header_len })
    }
}

/// Where a model's tensors come from.
#[derive(Debug)]
pub enum WeightSource {
    /// A Hugging Face folder: tensor name → shard index.
    SafeTensors {
        /// The weight files, each mapped.
        shards: Vec<Shard>,
        /// Which shard holds each tensor, by the text model's name (see [`text_model_name`]),
        /// and the name it is stored under.
        index: BTreeMap<String, (usize, String)>,
    },
    /// A GGUF file (its tensors renamed to Hugging Face's names on the way).
    Gguf(Box<GgufFile>),
    /// Random weights of a model's shape, for benchmarks on machines without the model file:
    /// linear weights and tables drawn uniformly with standard deviation 0.02 (the usual
    /// initializer range), norm weights 1, the same values for the same seed and name.
    Random {
        /// What errors call it (`random weights (SHAPE)`).
        label: PathBuf,
        /// The seed every tensor's values derive from, with its name.
        seed: u64,
    },
}

/// Description of one stored tensor, for `edgetune info`.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Its name in the file.
    pub name: String,
    /// Its shape, row-major.
    pub shape: Vec<usize>,
    /// Its storage type as the file names it (`BF16`, `Q4_1`).
    pub dtype: String,
    /// Bytes it takes in the file.
    pub bytes: usize,
}

/// The most weight files an index may name (the largest published models use a few hundred).
const MAX_SHARDS: usize = 10_000;

/// The path of a shard that `index` names: a relative path inside `dir` (no `..`, no root, no
/// drive) to a file (a link to a file is fine: the Hugging Face cache links its snapshots).
fn shard_path(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    use std::path::Component;
    let rel = Path::new(name);
    let inside = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return Err(Error::format(
            index,
            format!("`weight_map` names {name:?}, which is not a file inside the model folder"),
        ));
    }
    let path = dir.join(rel);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::format(index, format!("`weight_map` names {name:?}, which is not a file"))),
        Err(e) => Err(Error::io(&path, e)),
    }
}

impl WeightSource {
    /// Opens the safetensors files of a Hugging Face model folder.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = crate::files::read_config(&index_path)?;
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "field `weight_map` is missing or not an object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            if names.len() > MAX_SHARDS {
                return Err(Error::format(
                    &index_path,
                    format!("`weight_map` names {} files (at most {MAX_SHARDS})", names.len()),
                ));
            }
            names.iter().map(|n| shard_path(dir, &index_path, n)).collect::<Result<_>>()?
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(Error::format(dir, "no *.safetensors weights in this folder"));
        }
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().into_keys() {
                index.insert(text_model_name(&name), (i, name));
            }
            shards.push(shard);
        }
        Ok(WeightSource::SafeTensors { shards, index })
    }

    /// The file a message should name.
    pub fn path(&self) -> &Path {
        match self {
            WeightSource::SafeTensors { shards, .. } => &shards[0].path,
            WeightSource::Gguf(g) => &g.path,
            WeightSource::Random { label, .. } => label,
        }
    }

    /// Every stored tensor, for reporting.
    pub fn list(&self) -> Vec<StoredTensor> {
        match self {
            WeightSource::SafeTensors { shards, index } => index
                .iter()
                .filter_map(|(name, (i, stored))| {
                    let t = shards[*i].metadata.info(stored)?;
                    Some(StoredTensor {
                        name: name.clone(),
                        shape: t.shape.clone(),
                        dtype: format!("{:?}", t.dtype),
                        bytes: t.data_offsets.1 - t.data_offsets.0,
                    })
                })
                .collect(),
            WeightSource::Gguf(g) => g
                .tensors
                .values()
                .map(|t| StoredTensor {
                    name: t.name.clone(),
                    shape: t.shape(),
                    dtype: t.ty.name().into(),
                    bytes: t.n_bytes,
                })
                .collect(),
            WeightSource::Random { .. } => Vec::new(),
        }
    }

    /// The name a folder stores the tensor of Hugging Face name `hf_name` under, where it differs
    /// (a multimodal model's text tensors; see [`text_model_name`]).
    pub fn stored_name(&self, hf_name: &str) -> Option<&str> {
        match self {
            WeightSource::SafeTensors { index, .. } => index.get(hf_name).map(|(_, s)| s.as_str()),
            _ => None,
        }
    }

    /// Whether a tensor (by Hugging Face name) exists.
    pub fn contains(&self, cfg: &ModelConfig, hf_name: &str) -> bool {
        match self {
            WeightSource::SafeTensors { index, .. } => index.contains_key(hf_name),
            WeightSource::Gguf(g) => gguf_name(cfg, hf_name).is_some_and(|n| g.tensors.contains_key(&n)),
            WeightSource::Random { .. } => hf_name != "lm_head.weight" || !cfg.tie_word_embeddings,
        }
    }

    /// How a GGUF file stores the tensor of Hugging Face name `hf_name` (`None` for other
    /// sources, or a tensor it lacks).
    pub fn stored_type(&self, cfg: &ModelConfig, hf_name: &str) -> Option<GgmlType> {
        let WeightSource::Gguf(g) = self else { return None };
        gguf_name(cfg, hf_name).and_then(|n| g.tensors.get(&n)).map(|t| t.ty)
    }

    /// A linear weight's bytes as the file stores them, when their type is one `keep` accepts
    /// and the file holds `hf_name` as (n_out, n_in) = `expected`: a GGUF tensor's blocks, rows
    /// in Hugging Face order (llama.cpp's q/k permutation undone by moving whole rows of
    /// blocks), or a safetensors tensor's f32, f16 or bf16 values. Borrowed from the mapped file
    /// where no row moves. `None` for a random source, another type, or a safetensors tensor
    /// that [`WeightSource::get`] would refuse (it says why).
    pub fn stored_rows(
        &self,
        cfg: &ModelConfig,
        hf_name: &str,
        expected: [usize; 2],
        keep: impl Fn(GgmlType) -> bool,
    ) -> Result<Option<(GgmlType, Cow<'_, [u8]>)>> {
        let [n_out, n_in] = expected;
        let g = match self {
            WeightSource::Gguf(g) => g,
            WeightSource::SafeTensors { shards, index } => {
                let Some((shard, stored)) = index.get(hf_name).and_then(|(i, s)| Some((shards.get(*i)?, s))) else {
                    return Ok(None);
                };
                let Some(t) = shard.metadata.info(stored) else { return Ok(None) };
                let ty = match t.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::Bf16,
                    _ => return Ok(None),
                };
                // read_metadata validated every offset against the file length.
                let b = &shard.mmap[shard.data_start + t.data_offsets.0..shard.data_start + t.data_offsets.1];
                let fits = t.shape == expected && ty.bytes_for(n_out * n_in) == Some(b.len());
                return Ok(if keep(ty) && fits { Some((ty, Cow::Borrowed(b))) } else { None });
            }
            WeightSource::Random { .. } => return Ok(None),
        };
        let Some(info) = gguf_name(cfg, hf_name).and_then(|n| g.tensors.get(&n)) else { return Ok(None) };
        let Some(row) = info.ty.bytes_for(n_in).filter(|_| keep(info.ty)) else { return Ok(None) };
        if info.shape() != expected {
            return Err(Error::Shape {
                path: g.path.clone(),
                tensor: hf_name.into(),
                actual: info.shape(),
                expected: expected.to_vec(),
            });
        }
        let bytes = g.tensor_bytes(info);
        if bytes.len() != n_out * row {
            return Err(Error::format(
                &g.path,
                format!("tensor `{}`: {} bytes for {} {expected:?}", info.name, bytes.len(), info.ty.name()),
            ));
        }
        let heads = match (cfg.arch.gguf_permutes_qk(), info.name.as_str()) {
            (true, n) if n.ends_with("attn_q.weight") => Some(cfg.num_heads),
            (true, n) if n.ends_with("attn_k.weight") => Some(cfg.num_kv_heads),
            _ => None,
        };
        Ok(Some((
            info.ty,
            match heads {
                Some(h) => Cow::Owned(move_qk_rows(bytes, &[n_out, row], h, false)),
                None => Cow::Borrowed(bytes),
            },
        )))
    }

    /// A tensor by Hugging Face name, as f32 in row-major order, checked against `expected`.
    pub fn get(&self, cfg: &ModelConfig, hf_name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (data, shape) = match self {
            WeightSource::SafeTensors { shards, index } => {
                let (i, stored) = index
                    .get(hf_name)
                    .ok_or_else(|| Error::MissingTensor { path: shards[0].path.clone(), tensor: hf_name.into() })?;
                let shard = &shards[*i];
                let t = shard
                    .metadata
                    .info(stored)
                    .ok_or_else(|| Error::MissingTensor { path: shard.path.clone(), tensor: hf_name.into() })?;
                // read_metadata validated every offset against the file length.
                let b = &shard.mmap[shard.data_start + t.data_offsets.0..shard.data_start + t.data_offsets.1];
                let data = decode_floats(t.dtype, b, &shard.path, hf_name)?;
                (data, t.shape.clone())
            }
            WeightSource::Gguf(g) => {
                let name = gguf_name(cfg, hf_name)
                    .ok_or_else(|| Error::MissingTensor { path: g.path.clone(), tensor: hf_name.into() })?;
                let (mut data, shape) = g.tensor_f32(&name)?;
                if let Some(heads) = gguf_permuted_heads(cfg, &name) {
                    data = unpermute_rows(&data, &shape, heads);
                }
                // llama.cpp's converter stores Gemma's norm weights as the 1 + w they scale by;
                // the Hugging Face value is w.
                if cfg.norm_offset != 0.0 && name.ends_with("norm.weight") {
                    data.iter_mut().for_each(|v| *v -= cfg.norm_offset);
                }
                (data, shape)
            }
            WeightSource::Random { seed, .. } => {
                let n = expected.iter().product();
                let data = if hf_name.ends_with("norm.weight") {
                    vec![1.0 - cfg.norm_offset; n]
                } else {
                    let mut h = FNV_OFFSET;
                    fnv1a(&mut h, hf_name.as_bytes());
                    random_values(n, seed ^ h, 0.02)
                };
                (data, expected.to_vec())
            }
        };
        // A 1-D tensor may be stored as (n,) or (1, n); compare element layout, not rank.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&shape) != squeeze(expected) {
            return Err(Error::Shape {
                path: self.path().to_path_buf(),
                tensor: hf_name.into(),
                actual: shape,
                expected: expected.to_vec(),
            });
        }
        Ok(data)
    }
}

/// `n` values uniform in [-std·√3, std·√3] (standard deviation `std`), from SplitMix64 streams
/// of 64 Ki values each, filled on every core.
fn random_values(n: usize, seed: u64, std: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    let scale = std * 3f32.sqrt() * 2.0 / (1u64 << 24) as f32;
    let fill = |chunk: usize, part: &mut [f32]| {
        let mut state = seed ^ (chunk as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for v in part {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            *v = ((z >> 40) as f32 - (1u64 << 23) as f32) * scale;
        }
    };
    // Chunk i is seeded by i, whichever core fills it.
    let jobs = out.chunks_mut(CHUNK).enumerate().collect();
    crate::prim::run_parallel(jobs, |(i, part): (usize, &mut [f32])| fill(i, part));
    out
}

/// The name edgetune gives a stored tensor: a multimodal checkpoint's text model as a text-only
/// one's (`language_model.model.X`, as transformers saves Gemma 3's 4B and up, and
/// `model.language_model.X`, its own module path, as `model.X`; `language_model.lm_head.weight`
/// as `lm_head.weight`); every other name as it is.
pub fn text_model_name(stored: &str) -> String {
    for prefix in ["language_model.model.", "model.language_model."] {
        if let Some(rest) = stored.strip_prefix(prefix) {
            return format!("model.{rest}");
        }
    }
    match stored {
        "language_model.lm_head.weight" => "lm_head.weight".into(),
        other => other.into(),
    }
}

/// The heads whose rows llama.cpp's converter permutes in the GGUF tensor `name`: q's and k's
/// weights and biases in the families whose files permute them (see [`permute_rows`]); `None`
/// for every other tensor.
pub fn gguf_permuted_heads(cfg: &ModelConfig, name: &str) -> Option<usize> {
    let is = |m: &str| name.ends_with(&format!("{m}.weight")) || name.ends_with(&format!("{m}.bias"));
    match cfg.arch.gguf_permutes_qk() {
        true if is("attn_q") => Some(cfg.num_heads),
        true if is("attn_k") => Some(cfg.num_kv_heads),
        _ => None,
    }
}

/// Undoes llama.cpp's q/k permutation: GGUF rows, viewed as (n_head, rows/n_head/2, 2), are
/// the Hugging Face rows viewed as (n_head, 2, rows/n_head/2) with the last two axes swapped.
pub fn unpermute_rows(data: &[f32], shape: &[usize], n_head: usize) -> Vec<f32> {
    move_qk_rows(data, shape, n_head, false)
}

/// llama.cpp's q/k permutation (the converter's `permute`), the inverse of [`unpermute_rows`].
pub fn permute_rows(data: &[f32], shape: &[usize], n_head: usize) -> Vec<f32> {
    move_qk_rows(data, shape, n_head, true)
}

fn move_qk_rows<T: Copy + Default>(data: &[T], shape: &[usize], n_head: usize, to_gguf: bool) -> Vec<T> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product::<usize>().max(1);
    let half = rows / n_head / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // Hugging Face row (h, j, i) is GGUF row (h, i, j).
                let (hf, gguf) = ((h * 2 + j) * half + i, (h * half + i) * 2 + j);
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Maps a Hugging Face tensor name to its GGUF name.
pub fn gguf_name(cfg: &ModelConfig, hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => {
            return Some(if cfg.tie_word_embeddings { "token_embd.weight" } else { "output.weight" }.into());
        }
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if cfg.sandwich_norms => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // Phi-3's fused projections, as llama.cpp's phi3 names them.
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Little-endian F32, F16 or BF16 tensor bytes as f32 values (a large tensor decoded on the
/// CPU's cores, as GGUF's are).
pub(crate) fn decode_floats(dtype: Dtype, b: &[u8], path: &Path, name: &str) -> Result<Vec<f32>> {
    let ty = match dtype {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::Bf16,
        other => {
            return Err(Error::unsupported(
                path,
                format!("dtype {other:?} of tensor `{name}` (expected F32, F16 or BF16)"),
            ));
        }
    };
    let n = b.len() / (dtype.bitsize() / 8);
    crate::quant::gguf_blocks::dequantize(ty, b, n).map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))
}
