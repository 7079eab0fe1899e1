//! The Llama-family model on the GPU (Llama, Mistral, Qwen2, Qwen3, SmolLM): weights uploaded once,
//! linear weights held as NF4 (or f32 for parity checks), and the forward pass as a sequence of
//! kernel launches recorded into one command encoder per call.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::launch::{self, AttentionShape, OutCols, Q4_0_BLOCK, Q4Plane, RopeShape, Weight};
use crate::gpu::{BindGroups, Encoder};
use crate::lora::{GpuAdapter, GpuAdapterSet, Module};
use crate::model::config::{Activation, ModelConfig};
use crate::model::weights::WeightSource;
use crate::prim::{FNV_OFFSET, fnv1a};
use crate::quant::gguf_blocks::GgmlType;
use crate::quant::nf4;

/// How linear weights are held on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// 4-bit NF4 (bitsandbytes layout) for every linear weight: a GGUF base's blocks are
    /// dequantized and rounded again to NF4 (4.5 bits a weight with its scales).
    Nf4,
    /// Unquantized f32, for parity checks.
    None,
    /// The default. A GGUF base's quantized tensors keep the file's own values on the GPU (no
    /// re-quantization: the kernels compute with exactly the values llama.cpp does): Q4_0, Q4_1
    /// and Q4_K as 4-bit codes with f32 scales (5 or 6 bits a weight), Q8_0, Q5_0, Q5_1, Q5_K
    /// (12 bits) and Q6_K (16) as two 4-bit planes whose sum is the value. Its F16, BF16 and F32
    /// linear weights, and every linear weight of a Hugging Face folder, are held as NF4.
    #[default]
    Gguf,
}

impl Quant {
    /// Whether linear weights are held in 4-bit codes (NF4, or a GGUF's own blocks).
    pub fn four_bit(self) -> bool {
        matches!(self, Quant::Nf4 | Quant::Gguf)
    }
}

impl std::str::FromStr for Quant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Quant::Nf4),
            "none" | "f32" => Ok(Quant::None),
            "gguf" => Ok(Quant::Gguf),
            other => Err(Error::invalid("quant", format!("`{other}` (expected nf4, gguf or none)"))),
        }
    }
}

/// Options for loading a model onto the GPU.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How linear weights are held on the GPU: a GGUF file's own 4-bit blocks and NF4 for the
    /// rest (the default), NF4 throughout, or f32.
    pub quant: Quant,
    /// NF4 block size (bitsandbytes default 64).
    pub block_size: usize,
    /// KV-cache capacity in tokens (capped by the model's max_position_embeddings).
    pub max_context: usize,
    /// With NF4, hold the embedding and lm_head tables as f16 (half the memory of f32). With
    /// `Quant::None` everything stays f32.
    pub f16_tables: bool,
    /// The most tokens one forward pass runs when the next token is asked for or a text is run
    /// whole ([`Model::forward_hidden`], scoring) (1 to 65,535; default [`PREFILL_CHUNK`]): a
    /// longer input runs in chunks of this many, each
    /// attending to what the ones before it put in the KV cache, so its activations take no
    /// more memory than this many tokens' ([`Model::activation_bytes`]) and no grid or
    /// activation buffer grows with it (a GPU runs at most 65,535 workgroups along a
    /// dimension, and binds at most `max_storage_buffer_binding_size` bytes of a buffer).
    pub prefill_chunk: usize,
}

/// The most workgroups a dispatch may run along one dimension that every adapter allows
/// (WebGPU's default and Vulkan's minimum), which the launchers' grids assume.
const MAX_GRID_DIMENSION: usize = 65535;

/// [`LoadOptions::prefill_chunk`] by default: 1,024 tokens, whose activations take about
/// 133 MiB for Llama 3.2 1B and 240 MiB for Llama 3.1 8B ([`Model::activation_bytes`]), in
/// passes whose products have 8 rows of 128 x 128 tiles.
pub const PREFILL_CHUNK: usize = 1024;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quant: Quant::Gguf,
            block_size: nf4::DEFAULT_BLOCK_SIZE,
            max_context: 2048,
            f16_tables: true,
            prefill_chunk: PREFILL_CHUNK,
        }
    }
}

#[derive(Debug)]
pub(crate) enum LinearWeight {
    Dense(wgpu::Buffer),
    Nf4 {
        packed: wgpu::Buffer,
        absmax: wgpu::Buffer,
        block_size: usize,
    },
    Q4_0 {
        packed: wgpu::Buffer,
        scales: wgpu::Buffer,
    },
    Q4_1 {
        packed: wgpu::Buffer,
        coeffs: wgpu::Buffer,
    },
    /// Q8_0, Q5_0, Q5_1, Q5_K and Q6_K as two Q4_1 planes (hi, lo) of `block_size`.
    Planes {
        hi: [wgpu::Buffer; 2],
        lo: [wgpu::Buffer; 2],
        block_size: usize,
    },
}

/// One linear layer: y = x W^T (+ b), W (n_out, n_in).
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: LinearWeight,
    pub(crate) bias: Option<wgpu::Buffer>,
    pub(crate) n_out: usize,
    pub(crate) n_in: usize,
}

impl Linear {
    pub(crate) fn weight(&self) -> Weight<'_> {
        match &self.weight {
            LinearWeight::Dense(b) => Weight::Dense(b),
            LinearWeight::Nf4 { packed, absmax, block_size } => Weight::Nf4 { packed, absmax, block_size: *block_size },
            LinearWeight::Q4_0 { packed, scales } => Weight::Q4_0 { packed, scales },
            LinearWeight::Q4_1 { packed, coeffs } => Weight::Q4_1 { packed, coeffs, block_size: Q4_0_BLOCK },
            LinearWeight::Planes { hi, lo, block_size } => Weight::Planes {
                hi: Q4Plane { packed: &hi[0], coeffs: &hi[1] },
                lo: Q4Plane { packed: &lo[0], coeffs: &lo[1] },
                block_size: *block_size,
            },
        }
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: wgpu::Buffer,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    /// Qwen3's per-head norms of q and k (`head_dim` weights each).
    pub(crate) qk_norm: Option<(wgpu::Buffer, wgpu::Buffer)>,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: wgpu::Buffer,
    /// Gemma's norms of the attention output and of the MLP output, before each joins the
    /// residual stream.
    pub(crate) post_attn_norm: Option<wgpu::Buffer>,
    pub(crate) post_ffn_norm: Option<wgpu::Buffer>,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Layer {
    pub(crate) fn linear(&self, m: crate::lora::Module) -> &Linear {
        use crate::lora::Module;
        match m {
            Module::QProj => &self.q,
            Module::KProj => &self.k,
            Module::VProj => &self.v,
            Module::OProj => &self.o,
            Module::GateProj => &self.gate,
            Module::UpProj => &self.up,
            Module::DownProj => &self.down,
            // The model holds the parts of a fused module, and is only asked for those.
            Module::QkvProj => &self.q,
            Module::GateUpProj => &self.gate,
        }
    }
}

/// A (vocab, dim) table stored in row chunks that each fit one storage binding: f32 for
/// parity checks, f16 pairs otherwise (half the memory; embeddings are never quantized).
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) chunks: Vec<(wgpu::Buffer, usize, usize)>, // (buffer, first row, rows)
    pub(crate) dim: usize,
    f16: bool,
}

impl Table {
    pub(crate) fn rows<'a>(&self, buf: &'a wgpu::Buffer) -> launch::Rows<'a> {
        if self.f16 { launch::Rows::F16(buf) } else { launch::Rows::F32(buf) }
    }
    pub(crate) fn weight<'a>(&self, buf: &'a wgpu::Buffer) -> Weight<'a> {
        if self.f16 { Weight::F16(buf) } else { Weight::Dense(buf) }
    }
}

/// LoRA dropout during training: the adapter's input is copied to `scratch` and masked there
/// (the base matmul sees the undropped input, as in PEFT). The mask of each (layer, module)
/// derives from `seed`, so recomputing a layer or its backward reproduces it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropout<'a> {
    pub(crate) scratch: &'a wgpu::Buffer,
    pub(crate) p: f32,
    pub(crate) seed: u32,
}

impl<'a> Dropout<'a> {
    pub(crate) fn module_seed(&self, layer: usize, module: Module) -> u32 {
        // A fused module (never adapted beside its parts) takes its first part's stream.
        let index = module.parts()[0].index();
        crate::prim::lowbias32(self.seed ^ crate::prim::lowbias32((layer * 8 + index) as u32 + 1))
    }

    /// Records copying `n` values of `x` into the scratch buffer and masking them there.
    pub(crate) fn apply(
        &self,
        ctx: &GpuContext,
        enc: &mut Encoder,
        x: &wgpu::Buffer,
        n: usize,
        layer: usize,
        module: Module,
    ) -> Result<&'a wgpu::Buffer> {
        enc.copy_buffer_to_buffer(x, 0, self.scratch, 0, (n * 4) as u64);
        launch::dropout(ctx, enc, self.scratch, n, self.p, self.module_seed(layer, module))?;
        Ok(self.scratch)
    }
}

/// A model resident on the GPU.
#[derive(Debug)]
pub struct Model {
    /// Its hyper-parameters.
    pub config: ModelConfig,
    /// The GPU it lives on.
    pub ctx: Arc<GpuContext>,
    /// How its linear weights are held.
    pub quant: Quant,
    /// Bytes of weights held on the GPU.
    pub weight_bytes: u64,
    /// KV-cache capacity in tokens.
    pub max_context: usize,
    /// The most prompt tokens one forward pass runs ([`LoadOptions::prefill_chunk`]).
    pub prefill_chunk: usize,
    /// A hash of the source weights (names, shapes and sampled values), so that a training
    /// checkpoint can tell the model it was made with from another one.
    pub fingerprint: u64,
    pub(crate) layers: Vec<Layer>,
    pub(crate) embed: Table,
    pub(crate) lm_head: Option<Table>,
    pub(crate) final_norm: wgpu::Buffer,
    pub(crate) cos_sin: wgpu::Buffer,
    /// The RoPE table of the sliding-window layers, where their RoPE differs (Gemma 3).
    pub(crate) cos_sin_sliding: Option<wgpu::Buffer>,
}

/// Per-sequence attention cache: keys and values of every past position, per layer, and the
/// buffers and bind groups of one-token forward passes, so that decoding a token makes none.
#[derive(Debug)]
pub struct KvCache {
    /// Each layer's keys and values: the cache's own, or its pool's
    /// ([`Model::new_caches_for`]), of which it holds positions base .. base + capacity.
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    /// Its first position in them.
    base: usize,
    /// Positions the layers' buffers hold (more than its capacity in a pool).
    held: usize,
    /// Which buffers: the caches of one pool share an id.
    pool: u64,
    /// Positions filled so far.
    pub len: usize,
    /// Positions it holds (at most the model's `max_context`).
    pub capacity: usize,
    /// Made at the first one-token pass, for LoRA ranks up to its `rank`.
    decode: Option<DecodeBuffers>,
    /// Whether `decode.picked` holds what the last pass picked by argmax, for a next step fed
    /// by it ([`StepToken::Picked`]).
    argmax_picked: bool,
    binds: Arc<BindGroups>,
}

/// The activations of a forward pass of `t` tokens.
#[derive(Debug, Clone)]
struct Acts {
    t: usize,
    rank: usize,
    ids: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    q_raw: wgpu::Buffer,
    k_raw: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    proj: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    act: wgpu::Buffer,
    positions: wgpu::Buffer,
    key_start: wgpu::Buffer,
    /// The first key each token sees on a layer with a sliding window (one float without).
    window_start: wgpu::Buffer,
    stats: wgpu::Buffer,
    h_lora: wgpu::Buffer,
}

/// The first key each query sees within a sliding window of `window` keys: query i sits at key
/// index first + i and its own sample starts at key_start[i].
pub(crate) fn window_starts(key_start: &[u32], first: usize, window: usize) -> Vec<u32> {
    key_start.iter().enumerate().map(|(i, &s)| s.max((first + i + 1).saturating_sub(window) as u32)).collect()
}

/// The buffers of one transformer block (see [`Model::block_forward`]): the residual stream in,
/// after attention and out; the activations; and the tokens' positions and first visible keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockBuffers<'a> {
    pub(crate) x_in: &'a wgpu::Buffer,
    pub(crate) x_mid: &'a wgpu::Buffer,
    pub(crate) x_out: &'a wgpu::Buffer,
    pub(crate) xn: &'a wgpu::Buffer,
    pub(crate) q: &'a wgpu::Buffer,
    pub(crate) k: &'a wgpu::Buffer,
    /// Where the q and k projections land before their per-head norms, for a model that has
    /// them (Qwen3); unused otherwise.
    pub(crate) q_raw: &'a wgpu::Buffer,
    pub(crate) k_raw: &'a wgpu::Buffer,
    pub(crate) v: &'a wgpu::Buffer,
    pub(crate) att: &'a wgpu::Buffer,
    /// Where the o and down projections land before Gemma's norms after attention and the
    /// MLP; unused otherwise.
    pub(crate) attn_out: &'a wgpu::Buffer,
    pub(crate) mlp_out: &'a wgpu::Buffer,
    pub(crate) stats: &'a wgpu::Buffer,
    pub(crate) gate: &'a wgpu::Buffer,
    pub(crate) up: &'a wgpu::Buffer,
    pub(crate) act: &'a wgpu::Buffer,
    pub(crate) lora_h: LoraH<'a>,
    /// Where the attention norm and the MLP norm keep each row's 1 / rms (training, whose
    /// backward pass reads the normed rows through the norms: `RowInput::RmsNormKept`); `None`
    /// keeps nothing.
    pub(crate) inv_rms: Option<[&'a wgpu::Buffer; 2]>,
    pub(crate) positions: &'a wgpu::Buffer,
    pub(crate) key_start: &'a wgpu::Buffer,
    /// Where keys and values go and attention reads them: a KV cache's layer buffers
    /// (inference); `None` reads `k` and `v` themselves at position 0 (a training batch).
    pub(crate) kv_cache: Option<LayerKv<'a>>,
    /// Decoding several sequences at once ([`Model::decode_rows`]): row i's key and value go to
    /// its own cache and its attention reads that cache; `kv_cache` is then `None`.
    pub(crate) rows: Option<&'a RowsPass<'a>>,
}

/// One layer of a KV cache in a pass: its keys and values, where the sequence's position 0 lies
/// in them (`base`: its slot in a pool of caches) and the position of the pass's first token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerKv<'a> {
    k: &'a wgpu::Buffer,
    v: &'a wgpu::Buffer,
    base: usize,
    pos: usize,
}

/// Where a forward pass's keys and values go (see [`Model::record_forward`]).
#[derive(Debug, Clone, Copy)]
enum PassKv<'a> {
    /// One sequence's cache, from its length on.
    Cache(&'a KvCache),
    /// Each row its own sequence's.
    Rows(&'a RowsPass<'a>),
}

/// A pass of one token for each of `rows` sequences ([`Model::decode_rows`]): the rows grouped
/// by their caches' pool, and the rows' adapters.
#[derive(Debug)]
pub(crate) struct RowsPass<'a> {
    rows: usize,
    groups: Vec<RowsGroup<'a>>,
    lora: RowsLora<'a>,
}

/// The rows of a [`RowsPass`] whose caches share a pool, whose keys and values one dispatch a
/// layer writes and one attends over: the pool's layer buffers, and each row's (first, end)
/// keys ([`launch::attention_rows_forward`]; none for the other groups' rows) with the most
/// keys a row sees and those all see, on layers without a sliding window and on those with one.
#[derive(Debug)]
struct RowsGroup<'a> {
    k: &'a [wgpu::Buffer],
    v: &'a [wgpu::Buffer],
    ranges: [&'a wgpu::Buffer; 2],
    keys: [(usize, usize); 2],
}

/// The adapters of a [`RowsPass`]'s rows: every resident adapter's parameters, the table of
/// each row's slices ([`GpuAdapterSet::table`]) on the GPU and as written, and a module's
/// columns in h (the largest rank).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowsLora<'a> {
    /// Each layer's matrices of every resident adapter.
    layers: &'a [wgpu::Buffer],
    table: &'a wgpu::Buffer,
    entries: &'a [u32],
    width: usize,
    rows: usize,
}

impl RowsLora<'_> {
    /// Layer l's adapters with module m's entries.
    fn adapters(&self, l: usize, m: Module) -> launch::RowsAdapters<'_> {
        let table_row = (l * Module::ALL.len() + m.index()) * self.rows;
        launch::RowsAdapters { w: &self.layers[l], table: self.table, table_row, width: self.width }
    }
}

/// Where a block's forward pass puts the LoRA products x A^T of each group of modules that read
/// one input: one buffer for all (inference, where each group's overwrites the one before) or
/// one a group (training, whose backward pass reads them again).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraH<'a> {
    /// q, k and v: (T, 3r) at most.
    pub(crate) qkv: &'a wgpu::Buffer,
    /// o: (T, r).
    pub(crate) o: &'a wgpu::Buffer,
    /// gate and up: (T, 2r) at most.
    pub(crate) gate_up: &'a wgpu::Buffer,
    /// down: (T, r).
    pub(crate) down: &'a wgpu::Buffer,
}

impl<'a> LoraH<'a> {
    /// One buffer for every group.
    pub(crate) fn one(h: &'a wgpu::Buffer) -> Self {
        LoraH { qkv: h, o: h, gate_up: h, down: h }
    }
}

/// A LoRA slot's x A^T into h: (m, r) from (m, k).
fn lora_a_product<'a>(
    x: &'a wgpu::Buffer,
    (a, s): (&'a GpuAdapter, &crate::lora::Slot),
    h: &'a wgpu::Buffer,
    (m, k): (usize, usize),
) -> launch::Matmul<'a> {
    let r = a.layout.r;
    launch::Matmul { x, w: Weight::DenseAt(&a.params, s.a), bias: None, y: h, m, n: r, k, out: OutCols::whole(r) }
}

/// The key table of a rows step for the rows whose caches are in `pool`, on layers with
/// `window` (or none): each row's (first, end) keys in the pool, its token the last, and (0, 0)
/// for the other pools' rows; with the most keys a row of the pool sees and their sum.
fn key_ranges(rows: &[DecodeRow<'_>], pool: u64, window: Option<usize>) -> (Vec<u32>, (usize, usize)) {
    let mut table = vec![0u32; 2 * rows.len()];
    let mut seen = (0, 0);
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.cache.pool == pool) {
        let (base, end) = (r.cache.base, r.cache.len + 1);
        let first = window.map_or(0, |w| end.saturating_sub(w));
        table[2 * i..2 * i + 2].copy_from_slice(&[(base + first) as u32, (base + end) as u32]);
        seen = (seen.0.max(end - first), seen.1 + end - first);
    }
    (table, seen)
}

/// Rows with adapters of their own ([`RowsLora`]): the x A^T of `modules`, which read the same
/// x of `n_in` features and follow each other in [`Module::ALL`], in one dispatch into h, each
/// module's `r.width` columns after the one before's. Returns where each module's x A^T is in
/// h, as (first column, row stride).
fn lora_rows_shared(
    enc: &mut Encoder,
    ctx: &GpuContext,
    (l, modules, n_in): (usize, &[Module], usize),
    r: RowsLora<'_>,
    (x, input): (&wgpu::Buffer, Option<launch::RowInput<'_>>),
    h: &wgpu::Buffer,
) -> Result<Vec<Option<(usize, usize)>>> {
    let first = modules[0].index();
    if input.is_some() || modules.iter().enumerate().any(|(i, m)| m.index() != first + i) {
        return Err(Error::invalid("rows", "gathered x A^T of modules that follow each other, of x as it is"));
    }
    let a = launch::LoraRowsA { x, adapters: r.adapters(l, modules[0]), modules: modules.len(), h, rows: r.rows, n_in };
    launch::lora_rows_a(ctx, enc, a)?;
    let stride = modules.len() * r.width;
    Ok((0..modules.len()).map(|i| Some((i * r.width, stride))).collect())
}

/// Whether a forward pass writes the final normed hidden states, or leaves the final norm to
/// the one-row products that read the residual stream (decoding's LM head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalNorm {
    Written,
    Fused,
}

/// The operands of [`Model::linear`].
#[derive(Clone, Copy)]
pub(crate) struct LinearIo<'a> {
    /// (m, n_in) input.
    pub(crate) x: &'a wgpu::Buffer,
    /// (m, n_out) output.
    pub(crate) y: &'a wgpu::Buffer,
    /// Add the product to what y holds instead of overwriting it.
    pub(crate) add_to_y: bool,
    /// Scratch of at least (m, r) floats for the LoRA product x A^T.
    pub(crate) h: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub(crate) m: usize,
    /// The op before the products that they fuse into reading x (one row: decoding), or
    /// `None` where x is their input as it is.
    pub(crate) input: Option<launch::RowInput<'a>>,
    /// Where in h this module's x A^T already is, as (first column, row stride): decoding,
    /// prompts and training run it for the modules that share an input at once (see
    /// [`Model::lora_a_shared`]).
    pub(crate) lora_h_at: Option<(usize, usize)>,
    /// Each row's own adapter (decoding several sequences: [`Model::decode_rows`]), applied by
    /// gathered LoRA after the base product.
    pub(crate) rows_lora: Option<RowsLora<'a>>,
}

/// An attention or MLP branch's last projection (see [`Model::branch`]).
struct Branch<'b> {
    module: Module,
    x: &'b wgpu::Buffer,
    /// The op that the products fuse into reading x (see [`LinearIo::input`]).
    input: Option<launch::RowInput<'b>>,
    post_norm: Option<&'b wgpu::Buffer>,
    kept: &'b wgpu::Buffer,
    stage: Stage,
    /// Where the module's x A^T goes.
    lora_h: &'b wgpu::Buffer,
    /// The residual stream before and after the branch is added (one buffer: in place).
    residual: (&'b wgpu::Buffer, &'b wgpu::Buffer),
}

/// Where [`Model::lora_a_shared`] puts each module's x A^T.
pub(super) struct SharedA {
    /// Each module's (first column, row stride) in h; `None` where it is not adapted.
    pub(super) at: Vec<Option<(usize, usize)>>,
    /// The distinct A matrices' offsets in the adapter's buffer, in the order of their columns.
    firsts: Vec<usize>,
    /// The modules' input width.
    n_in: usize,
}

/// A point in [`Model::block_forward`] after which activations are complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The q and k projections before their per-head norms (only for a model with them).
    QkRaw,
    /// q and k after RoPE, and v.
    Qkv,
    /// The attention output and its softmax statistics.
    Attention,
    /// The o projection's output, before the norm after attention (only with those norms).
    AttnOut,
    /// The down projection's output, before the norm after the MLP (only with those norms).
    MlpOut,
    /// The residual stream after attention.
    Mid,
    /// The gate and up projections.
    GateUp,
    /// The block's output (the down projection's LoRA product is complete).
    Out,
}

/// The token of a one-token step ([`Model::submit_argmax`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepToken {
    /// This id, from the host.
    Id(u32),
    /// The id the cache's previous one-token step picked by argmax ([`Model::submit_argmax`],
    /// [`Model::next_argmax_with`]), copied on the GPU: the host need not have read it back.
    Picked,
}

/// The token of a row of a [`Model::decode_rows`] step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowToken {
    /// This id, from the host.
    Id(u32),
    /// The id that the decoder's previous step picked by argmax for its row at this index
    /// ([`Model::submit_rows_argmax`], [`Model::decode_rows_argmax`]), copied on the GPU: the
    /// host need not have read it back.
    Picked(usize),
}

/// What a forward pass runs: token ids from the host, or one token that the cache's last step
/// picked on the GPU ([`StepToken::Picked`]).
#[derive(Debug, Clone, Copy)]
enum StepInput<'a> {
    Ids(&'a [u32]),
    Picked,
}

/// What a KV cache keeps for decoding: one token's activations, its logits, and the partials
/// and result of choosing from them (argmax or top-k).
#[derive(Debug)]
struct DecodeBuffers {
    acts: Acts,
    logits: wgpu::Buffer,
    pick_partials: wgpu::Buffer,
    picked: wgpu::Buffer,
}

/// The buffers for decoding up to [`RowsDecoder::max_rows`] sequences at once, each with its
/// own cache and adapter ([`Model::decode_rows`]); made once by [`Model::rows_decoder`] and
/// reused for every token, so that a step creates nothing after its first.
#[derive(Debug)]
pub struct RowsDecoder {
    acts: Acts,
    /// For each group of rows that can share a pool: the rows' key ranges on layers without a
    /// sliding window and on those with one ([`RowsGroup`]).
    ranges: Vec<[wgpu::Buffer; 2]>,
    table: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// Where the logits are read back through (more than the context's own staging holds).
    staging: wgpu::Buffer,
    /// Greedy picks on the GPU: the argmax's partials, and each row's token.
    pick_partials: wgpu::Buffer,
    picked: wgpu::Buffer,
    /// The rows whose tokens the last step picked into `picked` by argmax (0 where it did not
    /// pick), which a step's [`RowToken::Picked`] rows can take.
    picked_rows: usize,
    /// Sampling's candidates chosen on the GPU ([`Model::decode_rows_top_k`]), made at the first
    /// such step: for k candidates a row, the partials and the rows' (value, id) pairs.
    top_k: Option<(usize, wgpu::Buffer, wgpu::Buffer)>,
    /// The adapter set and the rows' adapters that the table was last written for, and the
    /// table as written (one row reads its entries on the CPU).
    table_rows: Option<(u64, Vec<Option<usize>>)>,
    table_words: Vec<u32>,
    max_rank: usize,
    binds: Arc<BindGroups>,
}

impl RowsDecoder {
    /// The most sequences one step decodes.
    pub fn max_rows(&self) -> usize {
        self.ranges.len()
    }
}

/// One sequence of a [`Model::decode_rows`] step: its cache, the adapter it runs (an index
/// into the [`GpuAdapterSet`]; `None` runs the base model) and the token it takes next.
#[derive(Debug)]
pub struct DecodeRow<'a> {
    /// The sequence's cache, which grows by the token.
    pub cache: &'a mut KvCache,
    /// Its adapter among the resident ones.
    pub adapter: Option<usize>,
    /// Its next token.
    pub token: RowToken,
}

/// What to change when a KV cache does not fit.
const KV_ADVICE: &str = "open the model with a smaller max_context";

/// What to change when a forward pass's buffers do not fit.
const ACTIVATION_ADVICE: &str = "give a shorter prompt, or open the model with a smaller max_context";

/// The model's fingerprint hashes every this many values of each tensor.
const FINGERPRINT_STRIDE: usize = 61;

/// The bits of every [`FINGERPRINT_STRIDE`]th of the `n` values that `blocks` of `ty` hold, in
/// order, dequantizing only the blocks sampled, each once a job. Gathered on every core: this
/// is the first pass over a mapped file's pages, so its page faults come here.
fn sampled_bits(ty: GgmlType, blocks: &[u8], n: usize) -> std::result::Result<Vec<u32>, String> {
    /// Sampled values a job.
    const RUN: usize = 1 << 14;
    let (values, bytes) = ty.block();
    let mut sampled = vec![0u32; n.div_ceil(FINGERPRINT_STRIDE)];
    let jobs = sampled.chunks_mut(RUN).enumerate().collect();
    crate::prim::try_parallel(jobs, |(j, out): (usize, &mut [u32])| {
        let (mut held, mut block) = (None, vec![0f32; values]);
        for (k, bits) in out.iter_mut().enumerate() {
            let i = (j * RUN + k) * FINGERPRINT_STRIDE;
            let b = i / values;
            if held != Some(b) {
                let raw = blocks.get(b * bytes..(b + 1) * bytes).unwrap_or_default();
                crate::quant::gguf_blocks::dequantize_into(ty, raw, &mut block)?;
                held = Some(b);
            }
            *bits = block[i % values].to_bits();
        }
        Ok(())
    })?;
    Ok(sampled)
}

/// A tensor's values: decoded whole, or its bytes in the file (f32, f16, bf16 or ggml blocks,
/// rows of whole blocks), decoded a piece at a time (pieces that start and end on whole blocks:
/// a row's start, or 64 Ki values on).
enum Floats<'a> {
    Values(Vec<f32>),
    Stored(GgmlType, Cow<'a, [u8]>),
}

impl Floats<'_> {
    /// Values `first..first + out.len()` into `out`.
    fn read(&self, first: usize, out: &mut [f32]) -> std::result::Result<(), String> {
        let end = first + out.len();
        match self {
            Floats::Values(v) => {
                out.copy_from_slice(v.get(first..end).ok_or_else(|| format!("no values {first}..{end}"))?);
                Ok(())
            }
            Floats::Stored(ty, bytes) => {
                let (values, block) = ty.block();
                if !first.is_multiple_of(values) {
                    return Err(format!("value {first} starts no {} block", ty.name()));
                }
                let raw = bytes.get(first / values * block..end / values * block).unwrap_or_default();
                crate::quant::gguf_blocks::dequantize_into(*ty, raw, out)
            }
        }
    }

    /// The values quantized to NF4 (`shape`, blocks of `block_size`), a chunk at a time.
    fn nf4(&self, shape: &[usize], block_size: usize) -> std::result::Result<nf4::Nf4Tensor, String> {
        nf4::quantize_from(shape, block_size, |first, out| self.read(first, out))
    }

    /// Values `first..first + out.len()` into `out` through `put` (f32 to `out`'s element),
    /// 64 Ki values a job on the CPU's cores.
    fn read_as<T: Send>(
        &self,
        first: usize,
        out: &mut [T],
        put: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> std::result::Result<(), String> {
        const PIECE: usize = 1 << 16;
        let jobs = out.chunks_mut(PIECE).enumerate().collect();
        crate::prim::try_parallel(jobs, |(i, o): (usize, &mut [T])| {
            let mut values = vec![0f32; o.len()];
            self.read(first + i * PIECE, &mut values)?;
            put(&values, o);
            Ok(())
        })
    }
}

/// A linear weight's bytes in the file, which the uploader does not decode whole: blocks the
/// GPU keeps (`kept`), or values (f32, f16, bf16 or other ggml blocks) quantized to NF4 a
/// chunk at a time.
struct StoredRows<'a> {
    kept: bool,
    ty: GgmlType,
    bytes: Cow<'a, [u8]>,
}

struct Uploader<'a> {
    ctx: &'a GpuContext,
    src: &'a WeightSource,
    cfg: &'a ModelConfig,
    opts: &'a LoadOptions,
    bytes: u64,
    /// FNV-1a over every tensor's name, length and a strided sample of its values.
    hash: u64,
}

impl<'a> Uploader<'a> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.src.get(self.cfg, name, shape)?;
        fnv1a(&mut self.hash, name.as_bytes());
        fnv1a(&mut self.hash, &(v.len() as u64).to_le_bytes());
        for i in (0..v.len()).step_by(FINGERPRINT_STRIDE) {
            fnv1a(&mut self.hash, &v[i].to_bits().to_le_bytes());
        }
        Ok(v)
    }

    /// Feeds the fingerprint what [`Uploader::get`] would for a weight stored as `blocks` of
    /// `ty` (in Hugging Face row order): a model hashes the same however its weights are held.
    fn fingerprint_blocks(&mut self, name: &str, ty: GgmlType, blocks: &[u8], n: usize) -> Result<()> {
        fnv1a(&mut self.hash, name.as_bytes());
        fnv1a(&mut self.hash, &(n as u64).to_le_bytes());
        let sampled =
            sampled_bits(ty, blocks, n).map_err(|e| Error::format(self.src.path(), format!("tensor `{name}`: {e}")))?;
        for bits in sampled {
            fnv1a(&mut self.hash, &bits.to_le_bytes());
        }
        Ok(())
    }

    /// A buffer holding `data`, counted in the weights' bytes; the driver running out of memory
    /// is an error naming the tensor and the bytes uploaded up to it.
    fn buffer<T: bytemuck::Pod>(&mut self, name: &str, data: &[T]) -> Result<wgpu::Buffer> {
        self.bytes += std::mem::size_of_val(data) as u64;
        let what = format!("the model's weights up to `{name}`");
        let advice = if self.opts.quant == Quant::Gguf && matches!(self.src, WeightSource::Gguf(_)) {
            "load a smaller model, hold its weights as NF4 (quant = nf4: 4.5 bits a weight where the \
             file's own values take 5 to 16), or close what else uses the GPU"
        } else {
            "load a smaller model, or close what else uses the GPU"
        };
        self.ctx.allocating(&what, self.bytes, advice, || Ok(self.ctx.storage_from(name, data)))
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<wgpu::Buffer> {
        let v = self.get(name, &[n])?;
        self.buffer(name, &v)
    }

    /// An RMSNorm's weights as the kernel multiplies by them: w, or Gemma's 1 + w.
    fn norm(&mut self, name: &str, n: usize) -> Result<wgpu::Buffer> {
        let mut v = self.get(name, &[n])?;
        v.iter_mut().for_each(|w| *w += self.cfg.norm_offset);
        self.buffer(name, &v)
    }

    fn linear(&mut self, prefix: &str, n_out: usize, n_in: usize, bias: bool) -> Result<Linear> {
        let mut lin =
            self.fused(prefix, &[n_out], n_in)?.pop().ok_or_else(|| Error::Gpu(format!("{prefix}: no layer")))?;
        lin.bias = if bias { Some(self.vector(&format!("{prefix}.bias"), n_out)?) } else { None };
        Ok(lin)
    }

    /// The parts of a linear layer, split by rows: `rows` of each part, in order (one part for
    /// most layers; Phi-3's fused `qkv_proj` and `gate_up_proj` have several).
    fn fused(&mut self, prefix: &str, rows: &[usize], n_in: usize) -> Result<Vec<Linear>> {
        let name = format!("{prefix}.weight");
        let total: usize = rows.iter().sum();
        let mut parts = Vec::with_capacity(rows.len());
        match self.stored_rows(&name, total, n_in)? {
            Some(StoredRows { kept, ty, bytes }) => {
                self.fingerprint_blocks(&name, ty, &bytes, total * n_in)?;
                // stored_rows checked that the bytes hold `total` whole rows.
                let row = bytes.len() / total.max(1);
                let mut left = &bytes[..];
                for &n_out in rows {
                    let (part, rest) = left.split_at(n_out * row);
                    parts.push(if kept {
                        self.blocks_linear(&name, ty, part, n_out, n_in)?
                    } else {
                        self.nf4_linear(&name, ty, part, n_out, n_in)?
                    });
                    left = rest;
                }
            }
            None => {
                let mut w = self.get(&name, &[total, n_in])?;
                for &n_out in rows {
                    let rest = w.split_off(n_out * n_in);
                    parts.push(self.linear_of(&name, std::mem::replace(&mut w, rest), n_out, n_in)?);
                }
            }
        }
        Ok(parts)
    }

    /// A linear weight's bytes in the file, where they need not be decoded whole: with
    /// `Quant::Gguf`, a GGUF file's blocks that the GPU keeps (`true`), and for NF4 any other
    /// stored values whose rows are whole blocks, quantized a chunk at a time (`false`).
    fn stored_rows(&self, name: &str, n_out: usize, n_in: usize) -> Result<Option<StoredRows<'a>>> {
        let shape = [n_out, n_in];
        if self.opts.quant == Quant::Gguf
            && let Some((ty, b)) = self.src.stored_rows(self.cfg, name, shape, GgmlType::kept_on_gpu)?
        {
            return Ok(Some(StoredRows { kept: true, ty, bytes: b }));
        }
        if !self.nf4_fits(n_in) {
            return Ok(None);
        }
        Ok(self.src.stored_rows(self.cfg, name, shape, |_| true)?.map(|(ty, bytes)| StoredRows {
            kept: false,
            ty,
            bytes,
        }))
    }

    /// Whether linear weights of rows `n_in` long are held as NF4: the kernel reads whole packed
    /// words of 8 values, so rows must hold whole words (every real model's do); other shapes
    /// stay dense.
    fn nf4_fits(&self, n_in: usize) -> bool {
        self.opts.quant.four_bit() && n_in.is_multiple_of(8) && self.opts.block_size.is_multiple_of(8)
    }

    /// An NF4 linear layer from the stored values `bytes` (n_out, n_in) of type `ty`, decoded a
    /// chunk at a time as they are quantized.
    fn nf4_linear(&mut self, name: &str, ty: GgmlType, bytes: &[u8], n_out: usize, n_in: usize) -> Result<Linear> {
        let bs = self.opts.block_size;
        nf4::check_block_size(bs).map_err(|e| Error::invalid("NF4 block size", e))?;
        let q = Floats::Stored(ty, Cow::Borrowed(bytes))
            .nf4(&[n_out, n_in], bs)
            .map_err(|e| Error::format(self.src.path(), format!("tensor `{name}`: {e}")))?;
        self.nf4_weight(name, q, n_out, n_in)
    }

    /// An NF4 linear layer of tensor `name`, uploaded.
    fn nf4_weight(&mut self, name: &str, q: nf4::Nf4Tensor, n_out: usize, n_in: usize) -> Result<Linear> {
        let weight = LinearWeight::Nf4 {
            packed: self.buffer(name, &q.packed)?,
            absmax: self.buffer(name, &q.absmax)?,
            block_size: q.block_size,
        };
        Ok(Linear { weight, bias: None, n_out, n_in })
    }

    /// A linear layer held in its GGUF blocks (see [`Weight::Q4_0`], [`Weight::Q4_1`],
    /// [`Weight::Planes`]).
    fn blocks_linear(&mut self, name: &str, ty: GgmlType, blocks: &[u8], n_out: usize, n_in: usize) -> Result<Linear> {
        let n = n_out * n_in;
        let fail = |e: String| Error::format(self.src.path(), format!("tensor `{name}`: {e}"));
        let weight = match ty {
            _ if crate::quant::gguf_blocks::planes_block(ty).is_some() => {
                let p = crate::quant::gguf_blocks::planes_repacked(ty, blocks, n).map_err(fail)?;
                let mut plane = |(packed, coeffs): &(Vec<u8>, Vec<f32>)| -> Result<[wgpu::Buffer; 2]> {
                    Ok([self.buffer(name, packed)?, self.buffer(name, coeffs)?])
                };
                LinearWeight::Planes { hi: plane(&p.hi)?, lo: plane(&p.lo)?, block_size: p.block }
            }
            GgmlType::Q4_1 | GgmlType::Q4K => {
                let (packed, coeffs) = if ty == GgmlType::Q4K {
                    crate::quant::gguf_blocks::q4_k_repacked(blocks, n)
                } else {
                    crate::quant::gguf_blocks::q4_1_repacked(blocks, n)
                }
                .map_err(fail)?;
                LinearWeight::Q4_1 { packed: self.buffer(name, &packed)?, coeffs: self.buffer(name, &coeffs)? }
            }
            _ => {
                let (packed, scales) = crate::quant::gguf_blocks::q4_0_repacked(blocks, n).map_err(fail)?;
                LinearWeight::Q4_0 { packed: self.buffer(name, &packed)?, scales: self.buffer(name, &scales)? }
            }
        };
        Ok(Linear { weight, bias: None, n_out, n_in })
    }

    /// A linear layer without bias over the weights `w` (n_out, n_in) of tensor `name`.
    fn linear_of(&mut self, name: &str, w: Vec<f32>, n_out: usize, n_in: usize) -> Result<Linear> {
        if self.nf4_fits(n_in) {
            let q = nf4::quantize(&w, &[n_out, n_in], self.opts.block_size)
                .map_err(|e| Error::invalid("NF4 block size", e))?;
            return self.nf4_weight(name, q, n_out, n_in);
        }
        let limit = self.ctx.limits.max_storage_buffer_binding_size;
        if (w.len() * 4) as u64 > limit {
            return Err(Error::invalid(
                "quant",
                format!(
                    "`{name}` in f32 takes {} MiB, more than this adapter binds at once ({} MiB); load it with nf4",
                    (w.len() * 4) >> 20,
                    limit >> 20
                ),
            ));
        }
        let weight = LinearWeight::Dense(self.buffer(name, &w)?);
        Ok(Linear { weight, bias: None, n_out, n_in })
    }

    fn table(&mut self, name: &str, rows: usize, dim: usize) -> Result<Table> {
        // A stored table (floats, or GGUF blocks that rows hold whole) is decoded a piece at a
        // time into its chunks, never held whole in f32.
        let source = match self.src.stored_rows(self.cfg, name, [rows, dim], |_| true)? {
            Some((ty, bytes)) => {
                self.fingerprint_blocks(name, ty, &bytes, rows * dim)?;
                Floats::Stored(ty, bytes)
            }
            None => Floats::Values(self.get(name, &[rows, dim])?),
        };
        // f16 pairs need an even row length so that no pair straddles two rows.
        let f16 = self.opts.quant.four_bit() && self.opts.f16_tables && dim.is_multiple_of(2);
        let elem = if f16 { 2 } else { 4 };
        let limit = self.ctx.limits.max_storage_buffer_binding_size.min(self.ctx.limits.max_buffer_size) as usize;
        let rows_per = (limit / (dim * elem)).max(1);
        let fail = |e: String| Error::format(self.src.path(), format!("tensor `{name}`: {e}"));
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = rows_per.min(rows - start);
            let buf = if f16 {
                let mut halves = vec![half::f16::ZERO; n * dim];
                source.read_as(start * dim, &mut halves, |v, o| o.convert_from_f32_slice(v)).map_err(fail)?;
                self.buffer(name, &halves)?
            } else {
                let mut values = vec![0f32; n * dim];
                source.read_as(start * dim, &mut values, |v, o| o.copy_from_slice(v)).map_err(fail)?;
                self.buffer(name, &values)?
            };
            chunks.push((buf, start, n));
            start += n;
        }
        Ok(Table { chunks, dim, f16 })
    }
}

impl Model {
    /// Uploads a model from a weight source.
    pub fn load(ctx: Arc<GpuContext>, config: ModelConfig, src: &WeightSource, opts: &LoadOptions) -> Result<Self> {
        if !(1..=MAX_GRID_DIMENSION).contains(&opts.prefill_chunk) {
            return Err(Error::invalid(
                "prefill_chunk",
                format!("{} tokens: 1 to 65535 are expected (a GPU grid's largest dimension)", opts.prefill_chunk),
            ));
        }
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let max_context = c.usable_context(opts.max_context);
        let inv_freq = c.rope_inv_freq();
        // The RoPE table (a cos and a sin per rotated pair and position) is bound whole.
        let (rope, binding) = (
            crate::gpu::dispatch::storage_bytes(max_context * inv_freq.len() * 2),
            ctx.limits.max_storage_buffer_binding_size,
        );
        if rope > binding {
            let most = binding as usize / 4 / (inv_freq.len() * 2).max(1);
            return Err(Error::invalid(
                "max_context",
                format!(
                    "{max_context} positions need a RoPE table of {rope} bytes, more than the {binding} this GPU binds \
                     at once (max_storage_buffer_binding_size): {KV_ADVICE} (at most {most})"
                ),
            ));
        }
        let mut up = Uploader { ctx: &ctx, src, cfg: c, opts, bytes: 0, hash: FNV_OFFSET };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn_norm = up.norm(&format!("{p}.input_layernorm.weight"), h)?;
            let (q, k, v) = if c.fused_projections {
                let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
                let mut parts = up.fused(&format!("{p}.self_attn.qkv_proj"), &[qd, kvd, kvd], h)?.into_iter();
                let mut next = || parts.next().ok_or_else(|| Error::Gpu("qkv_proj split".into()));
                (next()?, next()?, next()?)
            } else {
                (
                    up.linear(&format!("{p}.self_attn.q_proj"), c.num_heads * hd, h, c.qkv_bias)?,
                    up.linear(&format!("{p}.self_attn.k_proj"), c.num_kv_heads * hd, h, c.qkv_bias)?,
                    up.linear(&format!("{p}.self_attn.v_proj"), c.num_kv_heads * hd, h, c.qkv_bias)?,
                )
            };
            let i = c.intermediate_size;
            let (gate, up_proj) = if c.fused_projections {
                let mut parts = up.fused(&format!("{p}.mlp.gate_up_proj"), &[i, i], h)?.into_iter();
                let mut next = || parts.next().ok_or_else(|| Error::Gpu("gate_up_proj split".into()));
                (next()?, next()?)
            } else {
                (
                    up.linear(&format!("{p}.mlp.gate_proj"), i, h, false)?,
                    up.linear(&format!("{p}.mlp.up_proj"), i, h, false)?,
                )
            };
            layers.push(Layer {
                attn_norm,
                q,
                k,
                v,
                qk_norm: match c.qk_norm {
                    true => Some((
                        up.norm(&format!("{p}.self_attn.q_norm.weight"), hd)?,
                        up.norm(&format!("{p}.self_attn.k_norm.weight"), hd)?,
                    )),
                    false => None,
                },
                o: up.linear(&format!("{p}.self_attn.o_proj"), h, c.num_heads * hd, false)?,
                ffn_norm: up.norm(&format!("{p}.{}.weight", c.mlp_norm_name()), h)?,
                post_attn_norm: match c.sandwich_norms {
                    true => Some(up.norm(&format!("{p}.post_attention_layernorm.weight"), h)?),
                    false => None,
                },
                post_ffn_norm: match c.sandwich_norms {
                    true => Some(up.norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?),
                    false => None,
                },
                gate,
                up: up_proj,
                down: up.linear(&format!("{p}.mlp.down_proj"), h, c.intermediate_size, false)?,
            });
        }
        let embed = up.table("model.embed_tokens.weight", c.vocab_size, h)?;
        let tied = c.tie_word_embeddings || !src.contains(c, "lm_head.weight");
        let lm_head = if tied { None } else { Some(up.table("lm_head.weight", c.vocab_size, h)?) };
        let final_norm = up.norm("model.norm.weight", h)?;
        let mut table = crate::prim::rope_table(&inv_freq, max_context);
        let factor = c.rope_attention_factor();
        if factor != 1.0 {
            table.iter_mut().for_each(|cs| *cs = cs.map(|v| v * factor));
        }
        let cos_sin = ctx.storage_from("rope cos/sin", &table);
        let cos_sin_sliding = c
            .sliding_rope_inv_freq()
            .map(|inv| ctx.storage_from("sliding rope cos/sin", &crate::prim::rope_table(&inv, max_context)));
        let weight_bytes = up.bytes;
        Ok(Model {
            fingerprint: up.hash,
            config,
            ctx,
            quant: opts.quant,
            weight_bytes,
            max_context,
            prefill_chunk: opts.prefill_chunk,
            layers,
            embed,
            lm_head,
            final_norm,
            cos_sin,
            cos_sin_sliding,
        })
    }

    /// The bytes [`Model::load`] uploads for `c`'s weights from `src` with `opts`, without
    /// loading them: NF4 codes and absmax scales (or f32, or a GGUF's own blocks as
    /// [`GgmlType::gpu_bytes`] counts them with `Quant::Gguf`) for the linear layers, f16 (or f32) embedding and lm_head tables, f32
    /// norms and biases. Divided by the parameter count, the bits a weight takes on the GPU.
    pub fn planned_weight_bytes(c: &ModelConfig, src: &WeightSource, opts: &LoadOptions) -> u64 {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let bs = opts.block_size;
        let linear = |l: usize, m: Module| {
            let (n_out, n_in) = m.shape(c);
            let n = n_out * n_in;
            // The tensor that holds m: itself, or the fused one it is part of (Phi-3).
            let stored = match Module::adaptable(c).into_iter().find(|f| f.parts().contains(&m)) {
                Some(f) => f,
                None => m,
            };
            let name = format!("model.layers.{l}.{}.{}.weight", stored.parent(), stored.name());
            let kept = match src.stored_type(c, &name) {
                Some(t) if t.bytes_for(n_in).is_some() => t.gpu_bytes(n),
                _ => None,
            };
            if let Some(bytes) = kept.filter(|_| opts.quant == Quant::Gguf) {
                bytes
            } else if opts.quant.four_bit() && n_in.is_multiple_of(8) && bs.is_multiple_of(8) && bs > 0 {
                n.div_ceil(8) * 4 + n.div_ceil(bs) * 4
            } else {
                n * 4
            }
        };
        let f16 = opts.quant.four_bit() && opts.f16_tables && h.is_multiple_of(2);
        let table = c.vocab_size * h * if f16 { 2 } else { 4 };
        let norms = 2 + if c.sandwich_norms { 2 } else { 0 };
        let vectors =
            if c.qkv_bias { (qd + 2 * kvd) * 4 } else { 0 } + if c.qk_norm { 2 * hd * 4 } else { 0 } + norms * h * 4;
        let layers: usize =
            (0..c.num_layers).map(|l| Module::ALL.iter().map(|&m| linear(l, m)).sum::<usize>() + vectors).sum();
        let tables = if c.tie_word_embeddings { table } else { 2 * table };
        (layers + tables + h * 4) as u64
    }

    /// Opens a Hugging Face folder or a `.gguf` file and uploads it.
    pub fn open(ctx: Arc<GpuContext>, path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (cfg, src) = crate::model::open_weights(path)?;
        Self::load(ctx, cfg, &src, opts)
    }

    /// The most tokens one pass (a prompt's chunk, or a training batch) can run with a LoRA
    /// rank up to `rank` and, where not 0, rows of `wide` values besides (LoRA dropout's masked
    /// inputs): a pass runs a workgroup per token along one grid dimension, of at most 65,535,
    /// and binds each activation, `tokens` rows of the widest of the hidden, MLP and query
    /// widths and the 3 r LoRA products, whole in one binding of at most
    /// `max_storage_buffer_binding_size` bytes.
    pub fn max_pass_tokens(&self, rank: usize, wide: usize) -> usize {
        let c = &self.config;
        let widest = [c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, 3 * rank.max(1), wide]
            .into_iter()
            .max()
            .unwrap_or(1);
        let binding = (self.ctx.limits.max_storage_buffer_binding_size / 16 * 16) as usize;
        (binding / 4 / widest).min(MAX_GRID_DIMENSION)
    }

    /// Refuses an adapter laid out as `layout` whose parameters do not fit one binding: the
    /// kernels bind an adapter's buffer whole (and training its gradients and AdamW moments,
    /// each as large), in at most `max_storage_buffer_binding_size` bytes.
    pub fn check_adapter_binds(&self, layout: &crate::lora::Layout) -> Result<()> {
        let (bytes, binding) =
            (crate::gpu::dispatch::storage_bytes(layout.len), self.ctx.limits.max_storage_buffer_binding_size);
        if bytes <= binding {
            return Ok(());
        }
        let per_rank = (layout.len / layout.r.max(1)).max(1);
        Err(Error::invalid(
            "lora",
            format!(
                "an adapter of {} parameters (rank {}) takes {bytes} bytes, more than the {binding} this GPU binds \
                 at once (max_storage_buffer_binding_size): lower lora.r (at most {} with these modules) or adapt \
                 fewer modules",
                layout.len,
                layout.r,
                binding as usize / 4 / per_rank
            ),
        ))
    }

    /// Bytes of one KV cache (keys and values, every layer, full capacity).
    pub fn kv_cache_bytes(&self) -> u64 {
        let c = &self.config;
        (2 * c.num_layers * self.max_context * c.num_kv_heads * c.head_dim * 4) as u64
    }

    /// Bytes of the activation buffers one forward pass of `t` tokens allocates with an adapter
    /// of rank `rank` (0 without one), plus the logits of `logit_rows` rows.
    pub fn activation_bytes(&self, t: usize, logit_rows: usize, rank: usize) -> u64 {
        let c = &self.config;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        // ids, positions, key starts; x, xn, q, k, v, att, gate, up, act; q and k before their
        // norms (Qwen3); the branch outputs before the norms after them (Gemma); the window
        // starts (sliding-window layers); attention stats; the LoRA products x A^T (q, k and v
        // at once).
        let raw = if c.qk_norm { qd + kvd } else { 0 };
        let proj = if c.sandwich_norms { c.hidden_size } else { 0 };
        let window = usize::from(c.sliding_window.is_some());
        let floats = t * (3 + 2 * c.hidden_size + 2 * qd + 2 * kvd + raw + proj + window + 3 * c.intermediate_size)
            + t * c.num_heads * 2
            + 3 * t * rank.max(1)
            + logit_rows * (c.vocab_size + c.hidden_size);
        (floats * 4) as u64
    }

    /// An empty KV cache for one sequence ([`Model::kv_cache_bytes`]); the driver running out of
    /// memory is [`Error::OutOfMemory`].
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_for(self.max_context)
    }

    /// An empty KV cache of `tokens` positions (at least 1, at most the model's `max_context`):
    /// for a sequence known to need no more, such as a prompt with a limit on its new tokens.
    pub fn new_cache_for(&self, tokens: usize) -> Result<KvCache> {
        self.new_caches_for(&[tokens])?.pop().ok_or_else(|| Error::Gpu("no cache made".into()))
    }

    /// Empty KV caches of `tokens[i]` positions each (as [`Model::new_cache_for`] makes one),
    /// sharing each layer's buffers, as many to a pool as one binding holds: the sequences that
    /// [`Model::decode_rows`] decodes together, whose attention then runs in one dispatch a
    /// layer for all the rows of a pool.
    pub fn new_caches_for(&self, tokens: &[usize]) -> Result<Vec<KvCache>> {
        let c = &self.config;
        let kvd = c.num_kv_heads * c.head_dim;
        let binding = self.ctx.limits.max_storage_buffer_binding_size;
        let fits = |positions: usize| crate::gpu::dispatch::storage_bytes(positions * kvd) <= binding;
        let capacities: Vec<usize> = tokens.iter().map(|&t| t.clamp(1, self.max_context.max(1))).collect();
        let mut caches = Vec::with_capacity(tokens.len());
        let mut start = 0;
        while start < capacities.len() {
            // Each layer's keys (and values) are bound whole.
            let (mut end, mut held) = (start, 0);
            while end < capacities.len() && fits(held + capacities[end]) {
                held += capacities[end];
                end += 1;
            }
            if end == start {
                let capacity = capacities[start];
                let layer = crate::gpu::dispatch::storage_bytes(capacity * kvd);
                let most = binding as usize / 4 / kvd.max(1);
                return Err(Error::invalid(
                    "max_context",
                    format!(
                        "a KV cache of {capacity} tokens needs {layer} bytes of keys a layer, more than the {binding} \
                         this GPU binds at once (max_storage_buffer_binding_size): {KV_ADVICE} (at most {most})"
                    ),
                ));
            }
            caches.extend(self.kv_pool(&capacities[start..end])?);
            start = end;
        }
        Ok(caches)
    }

    /// Caches of these capacities in one pool of buffers, one after another.
    fn kv_pool(&self, capacities: &[usize]) -> Result<Vec<KvCache>> {
        static POOLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let c = &self.config;
        let held: usize = capacities.iter().sum();
        let n = held * c.num_kv_heads * c.head_dim;
        let what = if capacities.len() == 1 {
            format!("a KV cache of {held} tokens")
        } else {
            format!("{} KV caches of {held} tokens in all", capacities.len())
        };
        let (k, v): (Vec<wgpu::Buffer>, Vec<wgpu::Buffer>) =
            self.ctx.allocating(&what, (2 * c.num_layers * n * 4) as u64, KV_ADVICE, || {
                Ok((0..c.num_layers)
                    .map(|_| (self.ctx.storage_zeroed("k cache", n), self.ctx.storage_zeroed("v cache", n)))
                    .unzip())
            })?;
        let pool = POOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut base = 0;
        Ok(capacities
            .iter()
            .map(|&capacity| {
                let cache = KvCache {
                    k: k.clone(),
                    v: v.clone(),
                    base,
                    held,
                    pool,
                    len: 0,
                    capacity,
                    decode: None,
                    argmax_picked: false,
                    binds: BindGroups::new(),
                };
                base += capacity;
                cache
            })
            .collect())
    }

    /// The most sequences one decoding step takes with adapters of rank up to `max_rank`
    /// ([`Model::rows_decoder`]): their logits in one binding ([`Model::logit_rows`]), their
    /// rows in one pass ([`Model::max_pass_tokens`]).
    pub fn most_decode_rows(&self, max_rank: usize) -> usize {
        self.logit_rows().min(self.max_pass_tokens(max_rank, 0))
    }

    /// Buffers for decoding up to `max_rows` sequences at once with adapters of rank up to
    /// `max_rank` ([`GpuAdapterSet::max_rank`]; [`Model::decode_rows`]). Refused where their
    /// logits would not fit one binding ([`Model::logit_rows`] rows).
    pub fn rows_decoder(&self, max_rows: usize, max_rank: usize) -> Result<RowsDecoder> {
        let c = &self.config;
        let most = self.most_decode_rows(max_rank);
        if max_rows == 0 || max_rows > most {
            return Err(Error::invalid(
                "rows",
                format!(
                    "{max_rows} sequences at once; this model on this GPU decodes 1 to {most} (their logits are bound whole)"
                ),
            ));
        }
        let rank = max_rank.max(1);
        let planned = self.activation_bytes(max_rows, max_rows, rank)
            + (max_rows * (4 * max_rows + c.vocab_size + 2 * launch::argmax_groups(c.vocab_size))
                + Module::ALL.len() * c.num_layers * max_rows * 4) as u64
                * 4;
        let ctx = &self.ctx;
        ctx.allocating(&format!("decoding {max_rows} sequences at once"), planned, ACTIVATION_ADVICE, || {
            Ok(RowsDecoder {
                acts: self.acts(max_rows, rank),
                ranges: (0..max_rows)
                    .map(|_| [0, 1].map(|_| ctx.storage_zeroed("rows' key ranges", 2 * max_rows)))
                    .collect(),
                table: ctx.storage_zeroed("row adapters", Module::ALL.len() * c.num_layers * max_rows * 4),
                logits: ctx.storage_zeroed("row logits", max_rows * c.vocab_size),
                staging: ctx.staging("row logits readback", (max_rows * c.vocab_size * 4) as u64),
                pick_partials: ctx
                    .storage_zeroed("row pick partials", 2 * launch::argmax_groups(c.vocab_size) * max_rows),
                picked: ctx.storage_zeroed("row picks", max_rows),
                picked_rows: 0,
                top_k: None,
                table_rows: None,
                table_words: Vec::new(),
                max_rank: rank,
                binds: BindGroups::new(),
            })
        })
    }

    /// Refuses an adapter set made for another model: every slot of every member must be one of
    /// this model's modules, with its shape.
    fn check_adapter_set(&self, set: &GpuAdapterSet) -> Result<()> {
        for (i, layout) in set.layouts().enumerate() {
            for s in &layout.slots {
                let fits = s.layer < self.layers.len() && {
                    let l = self.layers[s.layer].linear(s.module);
                    s.n_in == l.n_in
                };
                if !fits {
                    return Err(Error::invalid(
                        "adapter",
                        format!(
                            "resident adapter {i} adapts layer {} {:?} with {} inputs, which this model does not have",
                            s.layer, s.module, s.n_in
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Decodes one token of each of several sequences in one pass: the base model's products
    /// run once over every row, each row's LoRA update comes from its own adapter among
    /// `adapters` (gathered LoRA), and each row's attention reads its own cache, which grows by
    /// its token. Returns the logits, (rows, vocab). The rows' caches are filled by prompts
    /// run as usual ([`Model::next_logits_with`] with each row's adapter); caches of one pool
    /// ([`Model::new_caches_for`]) have their keys written and their attention run in one
    /// dispatch each a layer, and each pool more adds two. `decoder` comes from
    /// [`Model::rows_decoder`]. With one row this gives what the one-sequence step gives,
    /// up to the order of the sums.
    pub fn decode_rows(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
    ) -> Result<Vec<f32>> {
        let ctx = &self.ctx;
        let mut enc = self.record_rows(decoder, adapters, rows)?;
        ctx.check()?;
        let bytes = (rows.len() * self.config.vocab_size * 4) as u64;
        enc.copy_buffer_to_buffer(&decoder.logits, 0, &decoder.staging, 0, bytes);
        let words = ctx.finish_read(ctx.submit_and_map(enc, &decoder.staging, bytes))?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }

    /// [`Model::decode_rows`] choosing each row's most likely next token on the GPU (the first of
    /// equal maxima, as greedy sampling on the CPU chooses): one id a row read back instead of
    /// its logits.
    pub fn decode_rows_argmax(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
    ) -> Result<Vec<u32>> {
        let enc = self.record_rows_argmax(decoder, adapters, rows)?;
        Ok(self.ctx.read_f32_after(enc, &decoder.picked, rows.len())?.into_iter().map(f32::to_bits).collect())
    }

    /// [`Model::decode_rows`] choosing each row's `k` (at most [`launch::MAX_TOP_K`]) most
    /// likely next tokens on the GPU, with their logits, as [`Model::next_top_k_with`] chooses
    /// them for one sequence: 2k words a row read back instead of its logits. Sampling from
    /// them gives what sampling from the row's logits with a top-k of `k` gives.
    pub fn decode_rows_top_k(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let (v, ctx) = (self.config.vocab_size, &self.ctx);
        if !(1..=launch::MAX_TOP_K).contains(&k) {
            return Err(Error::invalid("top-k", format!("k must be in 1..={} (got {k})", launch::MAX_TOP_K)));
        }
        if decoder.top_k.as_ref().is_none_or(|t| t.0 != k) {
            let n = decoder.max_rows();
            let partials = ctx.storage_zeroed("row top-k partials", launch::top_k_partials(v, k) * n);
            decoder.top_k = Some((k, partials, ctx.storage_zeroed("row top-k", 2 * k * n)));
        }
        let mut enc = self.record_rows(decoder, adapters, rows)?;
        let (_, partials, out) = decoder.top_k.as_ref().ok_or_else(|| Error::Gpu("top-k buffers missing".into()))?;
        launch::top_k_rows(ctx, &mut enc, (&decoder.logits, partials, out), (v, k), rows.len())?;
        let words = ctx.read_f32_after(enc, out, 2 * k * rows.len())?;
        Ok(words
            .chunks(2 * k)
            .map(|row| {
                let ids = row.chunks(2).map(|p| (p[1].to_bits(), p[0]));
                ids.filter(|p| p.0 != u32::MAX).collect()
            })
            .collect())
    }

    /// Submits a [`Model::decode_rows_argmax`] step and starts reading the rows' ids back into
    /// `staging` (4 bytes a row at least, [`GpuContext::staging`]) without waiting:
    /// [`GpuContext::finish_read`] returns them as its first `rows.len()` words. Rows whose
    /// token is [`RowToken::Picked`] take what this step's predecessor picked, copied on the
    /// GPU, so the next step can be submitted before the host has read this one back and the
    /// GPU runs the steps back to back (greedy decoding in [`crate::infer::generate_rows`]).
    /// Until the read is finished, `staging` must not be used again.
    pub fn submit_rows_argmax(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
        staging: &wgpu::Buffer,
    ) -> Result<crate::gpu::PendingRead> {
        self.ctx.check()?;
        let mut enc = self.record_rows_argmax(decoder, adapters, rows)?;
        let bytes = 4 * rows.len() as u64;
        enc.copy_buffer_to_buffer(&decoder.picked, 0, staging, 0, bytes);
        Ok(self.ctx.submit_and_map(enc, staging, bytes))
    }

    /// Records a [`Model::decode_rows`] step and the argmax of each row's logits into the
    /// decoder's `picked`, where the next step's [`RowToken::Picked`] rows find them.
    fn record_rows_argmax(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
    ) -> Result<Encoder> {
        let mut enc = self.record_rows(decoder, adapters, rows)?;
        let io = (&decoder.logits, &decoder.pick_partials, &decoder.picked);
        launch::argmax_rows(&self.ctx, &mut enc, io, self.config.vocab_size, rows.len())?;
        decoder.picked_rows = rows.len();
        Ok(enc)
    }

    /// Checks a [`Model::decode_rows`] step and records it, up to the rows' logits in the
    /// decoder's buffer; the rows' caches count their tokens.
    fn record_rows(
        &self,
        decoder: &mut RowsDecoder,
        adapters: &GpuAdapterSet,
        rows: &mut [DecodeRow<'_>],
    ) -> Result<Encoder> {
        let c = &self.config;
        let ctx = &self.ctx;
        let t = rows.len();
        if t == 0 || t > decoder.max_rows() {
            return Err(Error::invalid(
                "rows",
                format!("{t} sequences; this decoder takes 1 to {}", decoder.max_rows()),
            ));
        }
        if adapters.max_rank() > decoder.max_rank {
            return Err(Error::invalid(
                "adapters",
                format!("rank {}, past the {} this decoder was made for", adapters.max_rank(), decoder.max_rank),
            ));
        }
        for (i, r) in rows.iter().enumerate() {
            match r.token {
                RowToken::Id(id) if id as usize >= c.vocab_size => {
                    return Err(Error::invalid(
                        "token id",
                        format!("{id} (row {i}) is outside the vocabulary of {}", c.vocab_size),
                    ));
                }
                RowToken::Picked(j) if j >= decoder.picked_rows => {
                    return Err(Error::invalid(
                        "token",
                        format!(
                            "row {i} takes what the decoder's last step picked for its row {j}, and that step picked \
                             {} rows by argmax",
                            decoder.picked_rows
                        ),
                    ));
                }
                _ => {}
            }
            let layer_bytes = crate::gpu::dispatch::storage_bytes(r.cache.held * c.num_kv_heads * c.head_dim);
            let own = r.cache.k.len() == self.layers.len() && r.cache.k.iter().all(|b| b.size() == layer_bytes);
            if !own || r.cache.capacity > self.max_context || r.cache.base + r.cache.capacity > r.cache.held {
                return Err(Error::invalid("cache", format!("row {i}: its KV cache was made by another model")));
            }
            if r.cache.len >= r.cache.capacity {
                return Err(Error::invalid(
                    "context",
                    format!("row {i}: its cache holds its capacity of {}", r.cache.capacity),
                ));
            }
        }
        // The table (and the check of the set against this model) only when the set or the
        // rows' adapters change: a table made for one set is never read with another's buffers.
        let key = (adapters.id(), rows.iter().map(|r| r.adapter).collect::<Vec<_>>());
        if decoder.table_rows.as_ref() != Some(&key) {
            self.check_adapter_set(adapters)?;
            let table = adapters.table(&key.1)?;
            ctx.queue.write_buffer(&decoder.table, 0, bytemuck::cast_slice(&table));
            decoder.table_rows = Some(key);
            decoder.table_words = table;
        }
        let positions: Vec<u32> = rows.iter().map(|r| r.cache.len as u32).collect();
        let a = Acts { t, ..decoder.acts.clone() };
        ctx.queue.write_buffer(&a.positions, 0, bytemuck::cast_slice(&positions));
        let mut enc = ctx.encoder_with(&decoder.binds).whole();
        // The rows' ids: runs of ids from the host written, runs of picks copied on the GPU
        // (the last step's picks, in `picked` until this step's argmax).
        let mut i = 0;
        while i < t {
            let n = match rows[i].token {
                RowToken::Id(_) => {
                    let run: Vec<u32> = rows[i..]
                        .iter()
                        .map_while(|r| match r.token {
                            RowToken::Id(id) => Some(id),
                            RowToken::Picked(_) => None,
                        })
                        .collect();
                    ctx.queue.write_buffer(&a.ids, 4 * i as u64, bytemuck::cast_slice(&run));
                    run.len()
                }
                RowToken::Picked(j) => {
                    let n = rows[i..].iter().zip(j..).take_while(|(r, k)| r.token == RowToken::Picked(*k)).count();
                    enc.copy_buffer_to_buffer(&decoder.picked, 4 * j as u64, &a.ids, 4 * i as u64, 4 * n as u64);
                    n
                }
            };
            i += n;
        }
        decoder.picked_rows = 0;
        // The rows grouped by their caches' pool, each group's attention one dispatch a layer:
        // a row's keys are its cache's first .. its new token (within the window where a layer
        // has one), and the other groups' rows have none.
        let mut pools: Vec<u64> = Vec::new();
        for r in rows.iter() {
            if !pools.contains(&r.cache.pool) {
                pools.push(r.cache.pool);
            }
        }
        let mut groups = Vec::with_capacity(pools.len());
        for (pool, ranges) in pools.iter().zip(&decoder.ranges) {
            let mut keys = [(0, 0); 2];
            // Layers without a window, then (where the model has them) those with one.
            for (windowed, window) in
                [None, c.sliding_window].into_iter().enumerate().take(1 + usize::from(c.sliding_window.is_some()))
            {
                let (table, seen) = key_ranges(rows, *pool, window);
                ctx.queue.write_buffer(&ranges[windowed], 0, bytemuck::cast_slice(&table));
                keys[windowed] = seen;
            }
            let Some(r) = rows.iter().find(|r| r.cache.pool == *pool) else { continue };
            groups.push(RowsGroup { k: &r.cache.k, v: &r.cache.v, ranges: [&ranges[0], &ranges[1]], keys });
        }
        let pass = RowsPass {
            rows: t,
            groups,
            lora: RowsLora {
                layers: &adapters.layers,
                table: &decoder.table,
                entries: &decoder.table_words,
                width: decoder.max_rank,
                rows: t,
            },
        };
        self.record_forward(&mut enc, &a, PassKv::Rows(&pass), None, FinalNorm::Written)?;
        self.record_logits(&mut enc, &a.xn, &decoder.logits, t, None)?;
        drop(pass);
        for r in rows.iter_mut() {
            r.cache.len += 1;
            // The rows' picks go to the decoder's buffers, not the cache's.
            r.cache.argmax_picked = false;
        }
        Ok(enc)
    }

    /// Activation buffers for a pass of `t` tokens with LoRA rank up to `rank`, their ids to be
    /// written.
    fn acts(&self, t: usize, rank: usize) -> Acts {
        let c = &self.config;
        let ctx = &self.ctx;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let positions: Vec<u32> = (0..t as u32).collect();
        Acts {
            t,
            rank,
            ids: ctx.storage_zeroed("ids", t),
            x: ctx.storage_zeroed("x", t * h),
            xn: ctx.storage_zeroed("xn", t * h),
            q: ctx.storage_zeroed("q", t * qd),
            k: ctx.storage_zeroed("k", t * kvd),
            q_raw: ctx.storage_zeroed("q before its norm", if c.qk_norm { t * qd } else { 1 }),
            k_raw: ctx.storage_zeroed("k before its norm", if c.qk_norm { t * kvd } else { 1 }),
            v: ctx.storage_zeroed("v", t * kvd),
            att: ctx.storage_zeroed("att", t * qd),
            proj: ctx.storage_zeroed("branch output before its norm", if c.sandwich_norms { t * h } else { 1 }),
            g: ctx.storage_zeroed("gate", t * inter),
            u: ctx.storage_zeroed("up", t * inter),
            act: ctx.storage_zeroed("act", t * inter),
            positions: ctx.storage_from("positions", &positions),
            key_start: ctx.storage_zeroed("key start", t),
            window_start: ctx.storage_zeroed("window start", if c.sliding_window.is_some() { t } else { 1 }),
            stats: ctx.storage_zeroed("attention stats", t * c.num_heads * 2),
            // Room for the x A^T of q, k and v at once (decoding gathers them: lora_a_shared).
            h_lora: ctx.storage_zeroed("lora h", 3 * t * rank.max(1)),
        }
    }

    /// y = x W^T (+ b), or y += that when `io.add_to_y` (a residual add in the product's
    /// epilogue), plus the LoRA update scale * (x A^T) B^T when `lora` adapts this module: x A^T
    /// first, then the base product with the B product in it. One row (decoding) adds the B
    /// product in its epilogue, with the op before the products (`io.input`) fused into both;
    /// many rows sum it as more of the reduction. Where `io.lora_h_at` says x A^T is already in
    /// h, the B product reads it there.
    pub(crate) fn linear(
        &self,
        enc: &mut Encoder,
        (layer, module): (usize, Module),
        lora: Option<&GpuAdapter>,
        io: LinearIo<'_>,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let LinearIo { x, y, add_to_y, h, m, input, lora_h_at, rows_lora } = io;
        let l = self.layers[layer].linear(module);
        let ctx = &self.ctx;
        let base = if add_to_y { OutCols::whole(l.n_out).accumulated() } else { OutCols::whole(l.n_out) };
        let mm = launch::Matmul { x, w: l.weight(), bias: l.bias.as_ref(), y, m, n: l.n_out, k: l.n_in, out: base };
        if let Some(r) = rows_lora {
            // Each row its own adapter (gathered LoRA): x A^T (where the modules that share x
            // have not run it), then the base product over every row with each row's B product
            // in it.
            if input.is_some() || lora.is_some() || drop.is_some() || m != r.rows {
                return Err(Error::invalid("linear", "rows with adapters of their own take x as it is, and no other"));
            }
            let adapters = r.adapters(layer, module);
            let (h_col, h_stride) = match lora_h_at {
                Some(at) => at,
                None => {
                    let a = launch::LoraRowsA { x, adapters, modules: 1, h, rows: m, n_in: l.n_in };
                    launch::lora_rows_a(ctx, enc, a)?;
                    (0, r.width)
                }
            };
            if m > 1 {
                return launch::matmul_rows_lora_forward(ctx, enc, mm, launch::RowsB { adapters, h, h_col, h_stride });
            }
            // One row: its entry, as the table has it, is the one-row product's LoRA B.
            let e = r.entries.get(4 * adapters.table_row..4 * adapters.table_row + 4);
            let Some(&[_, b, rank, scale]) = e else {
                return Err(Error::invalid("rows", "the adapter table holds no entry for this row"));
            };
            let lora = (rank > 0).then(|| launch::LoraB {
                h,
                h_offset: h_col,
                h_stride,
                params: adapters.w,
                b_offset: b as usize,
                rank: rank as usize,
                scale: f32::from_bits(scale),
            });
            return launch::matvec_fused_forward(ctx, enc, mm, launch::Fused { lora, ..Default::default() });
        }
        let slot = lora.and_then(|a| a.layout.slot(layer, module).map(|s| (a, s)));
        if input.is_some() && (m != 1 || drop.is_some()) {
            return Err(Error::invalid("linear", "an op fused into the products needs one row and no dropout"));
        }
        // The adapter's input: with dropout, x masked.
        let adapted = |enc: &mut Encoder, group| match drop {
            Some(d) => d.apply(ctx, enc, x, m * l.n_in, layer, group),
            None => Ok(x),
        };
        if m == 1 {
            let lora = match slot {
                Some((a, s)) => {
                    let h_offset = match lora_h_at {
                        Some((at, _)) => at,
                        None => {
                            let x = adapted(enc, s.group)?;
                            let a_mm = lora_a_product(x, (a, &s), h, (m, l.n_in));
                            launch::matvec_fused_forward(
                                ctx,
                                enc,
                                a_mm,
                                launch::Fused { input, ..Default::default() },
                            )?;
                            0
                        }
                    };
                    let (params, b_offset, rank, scale) = (&a.params, s.b, a.layout.r, a.scale);
                    Some(launch::LoraB { h, h_offset, h_stride: rank, params, b_offset, rank, scale })
                }
                None => None,
            };
            return launch::matvec_fused_forward(ctx, enc, mm, launch::Fused { input, lora, gather: None });
        }
        let Some((a, s)) = slot else {
            return launch::matmul_forward(ctx, enc, mm);
        };
        let r = a.layout.r;
        // This module's x A^T in h: (first column, row stride).
        let (col, stride) = match lora_h_at {
            Some(at) => at,
            None => {
                let x = adapted(enc, s.group)?;
                launch::matmul_forward(ctx, enc, lora_a_product(x, (a, &s), h, (m, l.n_in)))?;
                (0, r)
            }
        };
        // The B product as more of the base product's reduction: one dispatch for both.
        let lora = launch::LoraB {
            h,
            h_offset: col,
            h_stride: stride,
            params: &a.params,
            b_offset: s.b,
            rank: r,
            scale: a.scale,
        };
        launch::matmul_lora_forward(ctx, enc, mm, lora, None)
    }

    /// How [`Model::lora_a_shared`] lays out the x A^T of the adapted ones among `modules`
    /// (layer l) in h: `None` where none is adapted (or more than 3 distinct A matrices).
    pub(super) fn lora_a_layout(&self, l: usize, modules: &[Module], a: &GpuAdapter) -> Option<SharedA> {
        let r = a.layout.r;
        let mut firsts: Vec<usize> = Vec::new();
        let mut n_in = 0;
        let mut at = Vec::with_capacity(modules.len());
        for &m in modules {
            at.push(a.layout.slot(l, m).map(|s| {
                n_in = self.layers[l].linear(m).n_in;
                let i = firsts.iter().position(|&f| f == s.a).unwrap_or_else(|| {
                    firsts.push(s.a);
                    firsts.len() - 1
                });
                i * r
            }));
        }
        if firsts.is_empty() || firsts.len() > 3 {
            return None;
        }
        let n = firsts.len() * r;
        Some(SharedA { at: at.into_iter().map(|c| c.map(|c| (c, n))).collect(), firsts, n_in })
    }

    /// With an adapter: x A^T of the adapted ones among `modules`, which read the same `m` rows
    /// x (one row: with the op `input` fused in), in one product into h, (m, n) for n = r times
    /// the distinct A matrices (Phi-3's q, k and v share theirs), their rows gathered from the
    /// adapter's buffer. Returns where each module's x A^T is in h, as (first column, row
    /// stride n) (`None` where the module is not adapted): [`Model::lora_a_layout`].
    pub(super) fn lora_a_shared(
        &self,
        enc: &mut Encoder,
        (l, modules, m): (usize, &[Module], usize),
        lora: Option<&GpuAdapter>,
        (x, input): (&wgpu::Buffer, Option<launch::RowInput<'_>>),
        h: &wgpu::Buffer,
    ) -> Result<Vec<Option<(usize, usize)>>> {
        let Some(a) = lora else { return Ok(vec![None; modules.len()]) };
        let Some(SharedA { at, firsts, n_in }) = self.lora_a_layout(l, modules, a) else {
            return Ok(vec![None; modules.len()]);
        };
        let first = firsts[0];
        let offsets = [firsts.get(1).copied().unwrap_or(first), firsts.get(2).copied().unwrap_or(first)];
        let n = firsts.len() * a.layout.r;
        let mm = launch::Matmul {
            x,
            w: Weight::DenseAt(&a.params, first),
            bias: None,
            y: h,
            m,
            n,
            k: n_in,
            out: OutCols::whole(n),
        };
        let gather = Some(launch::Gather { rows: a.layout.r, offsets });
        if m == 1 {
            launch::matvec_fused_forward(&self.ctx, enc, mm, launch::Fused { input, lora: None, gather })?;
        } else {
            launch::matmul_shared_forward(&self.ctx, enc, mm, launch::Shared { x_cols: None, gather })?;
        }
        Ok(at)
    }

    /// Runs `ids` through the transformer at the cache's next positions and returns the final
    /// normed hidden states (T, hidden) on the GPU. The cache grows by `ids.len()`. For one
    /// token the buffer is the cache's own, overwritten by its next one-token pass. More tokens
    /// than one pass takes ([`Model::pass_chunk`]) run in passes of that many, each submitted
    /// as it is recorded and copied into one buffer for them all.
    pub fn forward_hidden(&self, ids: &[u32], cache: &mut KvCache) -> Result<wgpu::Buffer> {
        self.forward_hidden_with(ids, cache, None)
    }

    /// [`Model::forward_hidden`] with a LoRA adapter applied (not merged).
    pub fn forward_hidden_with(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
    ) -> Result<wgpu::Buffer> {
        let chunk = self.pass_chunk(lora);
        if ids.len() <= chunk {
            let (enc, hidden) = self.record_hidden(StepInput::Ids(ids), cache, lora, FinalNorm::Written)?;
            self.ctx.submit([enc.finish()]);
            return Ok(hidden);
        }
        // The whole input is checked first, so one refused leaves the cache as it was.
        self.check_ids(ids, cache)?;
        let row = (self.config.hidden_size * 4) as u64;
        let bytes = ids.len() as u64 * row;
        if bytes > self.ctx.limits.max_buffer_size {
            return Err(Error::invalid(
                "input",
                format!(
                    "{} tokens: their hidden states take {bytes} bytes, more than the {} of this GPU's largest \
                     buffer (max_buffer_size); give at most {} tokens",
                    ids.len(),
                    self.ctx.limits.max_buffer_size,
                    self.ctx.limits.max_buffer_size / row
                ),
            ));
        }
        let what = format!("hidden states of {} tokens", ids.len());
        let out = self.ctx.allocating(&what, bytes, ACTIVATION_ADVICE, || {
            Ok(self.ctx.storage_zeroed("hidden states", ids.len() * self.config.hidden_size))
        })?;
        for (n, part) in ids.chunks(chunk).enumerate() {
            let (mut enc, hidden) = self.record_hidden(StepInput::Ids(part), cache, lora, FinalNorm::Written)?;
            enc.copy_buffer_to_buffer(&hidden, 0, &out, (n * chunk) as u64 * row, part.len() as u64 * row);
            self.ctx.submit([enc.finish()]);
        }
        Ok(out)
    }

    /// The most tokens one forward pass runs: [`Model::prefill_chunk`] within what the GPU runs in
    /// one pass with `lora`'s rank ([`Model::max_pass_tokens`]).
    pub fn pass_chunk(&self, lora: Option<&GpuAdapter>) -> usize {
        self.prefill_chunk.min(self.max_pass_tokens(lora.map_or(0, |a| a.layout.r), 0)).max(1)
    }

    /// Refuses `ids` that are empty, do not fit the cache after what it holds, or hold a token
    /// outside the vocabulary.
    fn check_ids(&self, ids: &[u32], cache: &KvCache) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("input", "no tokens to run"));
        }
        self.check_room(ids.len(), cache)?;
        let v = self.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(Error::invalid("token id", format!("{bad} is outside the vocabulary of {v}")));
        }
        Ok(())
    }

    /// Refuses `t` tokens more where they do not fit the cache after what it holds.
    fn check_room(&self, t: usize, cache: &KvCache) -> Result<()> {
        if cache.len + t > cache.capacity {
            return Err(Error::invalid(
                "context",
                format!("{} cached + {t} new tokens exceed the context capacity of {}", cache.len, cache.capacity),
            ));
        }
        Ok(())
    }

    /// Checks `ids`, then records their forward pass into a new encoder and returns it with the
    /// buffer that will hold the final normed hidden states. A one-token pass (decoding) runs
    /// in the cache's own buffers with the cache's bind groups, so after the first it creates
    /// nothing; a longer one (a prompt) gets buffers of its own, freed when it is done. Its
    /// callers run longer inputs in passes of [`Model::pass_chunk`], which this refuses past.
    fn record_hidden(
        &self,
        input: StepInput<'_>,
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
        final_norm: FinalNorm,
    ) -> Result<(Encoder, wgpu::Buffer)> {
        let c = &self.config;
        let rank = lora.map_or(0, |a| a.layout.r);
        let t = match input {
            StepInput::Ids(ids) => {
                self.check_ids(ids, cache)?;
                ids.len()
            }
            StepInput::Picked => {
                if !cache.argmax_picked || cache.decode.as_ref().is_none_or(|d| d.acts.rank < rank) {
                    return Err(Error::invalid(
                        "token",
                        "a step fed by the last step's pick needs the cache's last pass to be a one-token step \
                         that picked by argmax (with an adapter of at most its rank)",
                    ));
                }
                // The token comes from the GPU, an argmax over the vocabulary.
                self.check_room(1, cache)?;
                1
            }
        };
        // Until a one-token pass's argmax is recorded after it.
        cache.argmax_picked = false;
        let owned;
        let (mut enc, a) = if t == 1 {
            if cache.decode.as_ref().is_none_or(|d| d.acts.rank < rank) {
                // New buffers: the bind groups of the old ones go with them.
                cache.binds = BindGroups::new();
                let planned = self.activation_bytes(1, 1, rank);
                cache.decode = Some(self.ctx.allocating("decoding's buffers", planned, ACTIVATION_ADVICE, || {
                    let acts = self.acts(1, rank);
                    // The cache's first key, for layers without a sliding window.
                    self.ctx.queue.write_buffer(&acts.key_start, 0, bytemuck::bytes_of(&(cache.base as u32)));
                    Ok(DecodeBuffers {
                        acts,
                        logits: self.ctx.storage_zeroed("logits", c.vocab_size),
                        pick_partials: self.ctx.storage_zeroed("pick partials", self.pick_partials(c.vocab_size)),
                        picked: self.ctx.storage_zeroed("picked", 2 * launch::MAX_TOP_K),
                    })
                })?);
            }
            let d = cache.decode.as_ref().ok_or_else(|| Error::Gpu("decode buffers missing".into()))?;
            // One submission per decoded token.
            let mut enc = self.ctx.encoder_with(&cache.binds).whole();
            match input {
                StepInput::Ids(ids) => self.ctx.queue.write_buffer(&d.acts.ids, 0, bytemuck::cast_slice(ids)),
                // The id the last step's argmax left in the first word of `picked`.
                StepInput::Picked => enc.copy_buffer_to_buffer(&d.picked, 0, &d.acts.ids, 0, 4),
            }
            (enc, &d.acts)
        } else {
            let most = self.max_pass_tokens(rank, 0);
            if t > most {
                return Err(Error::invalid(
                    "prompt",
                    format!(
                        "{t} tokens in one pass; this model runs at most {most} on this GPU (grids of 65,535 \
                         workgroups, bindings of max_storage_buffer_binding_size): run them in passes of at most \
                         Model::pass_chunk tokens"
                    ),
                ));
            }
            let what = format!("activations for {t} tokens");
            let planned = self.activation_bytes(t, 0, rank);
            owned = self.ctx.allocating(&what, planned, ACTIVATION_ADVICE, || Ok(self.acts(t, rank)))?;
            // A pass of more than one token is fed from the host.
            if let StepInput::Ids(ids) = input {
                self.ctx.queue.write_buffer(&owned.ids, 0, bytemuck::cast_slice(ids));
            }
            if cache.base > 0 {
                self.ctx.queue.write_buffer(&owned.key_start, 0, bytemuck::cast_slice(&vec![cache.base as u32; t]));
            }
            (self.ctx.encoder(), &owned)
        };
        if let Some(w) = c.sliding_window {
            let starts = window_starts(&vec![cache.base as u32; t], cache.base + cache.len, w);
            self.ctx.queue.write_buffer(&a.window_start, 0, bytemuck::cast_slice(&starts));
        }
        self.record_forward(&mut enc, a, PassKv::Cache(cache), lora, final_norm)?;
        cache.len += t;
        Ok((enc, if final_norm == FinalNorm::Written { a.xn.clone() } else { a.x.clone() }))
    }

    /// Records the transformer over the activations `a` at positions pos.. of the KV cache
    /// (`kv`), or each row at the next position of its own ([`PassKv::Rows`]), ending with the
    /// final normed hidden states in `a.xn`, or with the residual stream in `a.x` where the
    /// final norm is left to the product that reads it.
    fn record_forward(
        &self,
        enc: &mut Encoder,
        a: &Acts,
        kv: PassKv<'_>,
        lora: Option<&GpuAdapter>,
        final_norm: FinalNorm,
    ) -> Result<()> {
        let c = &self.config;
        let ctx = &self.ctx;
        let (t, h) = (a.t, c.hidden_size);
        for (buf, start, rows) in &self.embed.chunks {
            launch::embedding_forward(
                ctx,
                enc,
                launch::Embedding {
                    ids: &a.ids,
                    table: self.embed.rows(buf),
                    out: &a.x,
                    n_tokens: t,
                    dim: h,
                    row_start: *start,
                    row_count: *rows,
                    scale: c.embedding_scale,
                },
            )?;
        }
        for l in 0..self.layers.len() {
            // In place: the residual stream stays in x.
            let b = BlockBuffers {
                x_in: &a.x,
                x_mid: &a.x,
                x_out: &a.x,
                xn: &a.xn,
                q: &a.q,
                k: &a.k,
                q_raw: &a.q_raw,
                k_raw: &a.k_raw,
                v: &a.v,
                att: &a.att,
                attn_out: &a.proj,
                mlp_out: &a.proj,
                stats: &a.stats,
                gate: &a.g,
                up: &a.u,
                act: &a.act,
                lora_h: LoraH::one(&a.h_lora),
                inv_rms: None,
                positions: &a.positions,
                key_start: if c.layer_window(l).is_some() { &a.window_start } else { &a.key_start },
                kv_cache: match kv {
                    PassKv::Cache(cache) => {
                        Some(LayerKv { k: &cache.k[l], v: &cache.v[l], base: cache.base, pos: cache.len })
                    }
                    PassKv::Rows(_) => None,
                },
                rows: match kv {
                    PassKv::Rows(rows) => Some(rows),
                    PassKv::Cache(..) => None,
                },
            };
            self.block_forward(enc, l, &b, lora, t, None, &mut |_, _| Ok(()))?;
        }
        if final_norm == FinalNorm::Fused {
            return Ok(());
        }
        launch::rms_norm_forward(
            ctx,
            enc,
            launch::RmsNorm { x: &a.x, w: &self.final_norm, y: &a.xn, n_rows: t, dim: h, eps: c.rms_norm_eps },
        )
    }

    /// Records transformer block `l` over `t` tokens: attention then the SwiGLU MLP, each
    /// behind an RMS norm and added to the residual stream (x_mid = x_in + attention,
    /// x_out = x_mid + MLP; the three may be one buffer, updated in place). The one forward
    /// code for decoding, prompts and training. `after` is called as each stage's activations
    /// are written (training keeps copies of them).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward(
        &self,
        enc: &mut Encoder,
        l: usize,
        b: &BlockBuffers<'_>,
        lora: Option<&GpuAdapter>,
        t: usize,
        drop: Option<Dropout<'_>>,
        after: &mut dyn FnMut(&mut Encoder, Stage) -> Result<()>,
    ) -> Result<()> {
        let c = &self.config;
        let ctx = &self.ctx;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let layer = &self.layers[l];
        let pos = b.kv_cache.map_or(0, |kv| kv.pos);
        // Decoding (one row through the cache) fuses each norm, and the MLP's gate, into the
        // one-row products that read them; otherwise the normed and gated rows are written
        // (training keeps them for the backward).
        let fuse = t == 1 && b.kv_cache.is_some();
        let normed = |enc: &mut Encoder, x, w, which: usize| -> Result<(&wgpu::Buffer, Option<launch::RowInput<'_>>)> {
            if fuse {
                return Ok((x, Some(launch::RowInput::RmsNorm { w, eps: c.rms_norm_eps })));
            }
            let norm = launch::RmsNorm { x, w, y: b.xn, n_rows: t, dim: h, eps: c.rms_norm_eps };
            match b.inv_rms {
                Some(kept) => launch::rms_norm_forward_keeping(ctx, enc, norm, kept[which])?,
                None => launch::rms_norm_forward(ctx, enc, norm)?,
            }
            Ok((b.xn, None))
        };
        let rows_lora = b.rows.map(|r| r.lora);
        let io =
            |(x, input), y, (h, lora_h_at)| LinearIo { x, y, add_to_y: false, h, m: t, input, lora_h_at, rows_lora };
        // The x A^T of the modules that read one input run as one product, into h, but where
        // dropout gives each module's adapter a differently masked input.
        let shared = |enc: &mut Encoder, modules: &[Module], input, h| -> Result<Vec<(&wgpu::Buffer, _)>> {
            let at = match (drop, rows_lora) {
                (Some(_), _) => vec![None; modules.len()],
                (None, Some(r)) => {
                    let n_in = layer.linear(modules[0]).n_in;
                    lora_rows_shared(enc, ctx, (l, modules, n_in), r, input, h)?
                }
                (None, None) => self.lora_a_shared(enc, (l, modules, t), lora, input, h)?,
            };
            Ok(at.into_iter().map(|at| (h, at)).collect())
        };
        let input = normed(enc, b.x_in, &layer.attn_norm, 0)?;
        let (q_proj, k_proj) = if layer.qk_norm.is_some() { (b.q_raw, b.k_raw) } else { (b.q, b.k) };
        let at = shared(enc, &[Module::QProj, Module::KProj, Module::VProj], input, b.lora_h.qkv)?;
        self.linear(enc, (l, Module::QProj), lora, io(input, q_proj, at[0]), drop)?;
        self.linear(enc, (l, Module::KProj), lora, io(input, k_proj, at[1]), drop)?;
        self.linear(enc, (l, Module::VProj), lora, io(input, b.v, at[2]), drop)?;
        if let Some((q_norm, k_norm)) = &layer.qk_norm {
            after(enc, Stage::QkRaw)?;
            let norm = |x, w, y, heads| launch::RmsNorm { x, w, y, n_rows: t * heads, dim: hd, eps: c.rms_norm_eps };
            let (q, k) = (norm(b.q_raw, q_norm, b.q, c.num_heads), norm(b.k_raw, k_norm, b.k, c.num_kv_heads));
            launch::rms_norm_pair_forward(ctx, enc, [q, k])?;
        }
        let rope = RopeShape {
            n_tokens: t,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: hd,
            rot_dim: c.rotary_dim,
            pos_offset: pos,
            positions: b.positions,
        };
        launch::rope_forward(ctx, enc, [b.q, b.k], self.rope_table(l), rope)?;
        after(enc, Stage::Qkv)?;
        if let Some(rows) = b.rows {
            self.rows_attention(enc, l, b, rows)?;
        } else {
            self.attention(enc, b, t)?;
        }
        after(enc, Stage::Attention)?;
        let out = Branch {
            module: Module::OProj,
            x: b.att,
            input: None,
            post_norm: layer.post_attn_norm.as_ref(),
            kept: b.attn_out,
            stage: Stage::AttnOut,
            lora_h: b.lora_h.o,
            residual: (b.x_in, b.x_mid),
        };
        self.branch(enc, l, out, b, (lora, t, drop), after)?;
        after(enc, Stage::Mid)?;
        let input = normed(enc, b.x_mid, &layer.ffn_norm, 1)?;
        let at = shared(enc, &[Module::GateProj, Module::UpProj], input, b.lora_h.gate_up)?;
        self.linear(enc, (l, Module::GateProj), lora, io(input, b.gate, at[0]), drop)?;
        self.linear(enc, (l, Module::UpProj), lora, io(input, b.up, at[1]), drop)?;
        after(enc, Stage::GateUp)?;
        let (x, input) = if fuse {
            (b.gate, Some(self.gated(b.up)))
        } else {
            self.gate_forward(enc, b.gate, b.up, b.act, t * inter)?;
            (b.act, None)
        };
        let out = Branch {
            module: Module::DownProj,
            x,
            input,
            post_norm: layer.post_ffn_norm.as_ref(),
            kept: b.mlp_out,
            stage: Stage::MlpOut,
            lora_h: b.lora_h.down,
            residual: (b.x_mid, b.x_out),
        };
        self.branch(enc, l, out, b, (lora, t, drop), after)?;
        after(enc, Stage::Out)
    }

    /// Writes a block's keys and values into the KV cache where there is one and runs attention
    /// over its `t` queries at the cache's positions (see [`Model::block_forward`]).
    fn attention(&self, enc: &mut Encoder, b: &BlockBuffers<'_>, t: usize) -> Result<()> {
        let c = &self.config;
        let (keys, values, shape) = match b.kv_cache {
            Some(LayerKv { k, v, base, pos }) => {
                let width = c.num_kv_heads * c.head_dim;
                let at = launch::KvAt::From(base + pos);
                let w = launch::KvWrite { k: b.k, v: b.v, k_cache: k, v_cache: v, n_rows: t, width, at };
                launch::kv_write(&self.ctx, enc, w)?;
                (k, v, AttentionShape { key_base: base, ..self.attention_shape(t, pos) })
            }
            None => (b.k, b.v, self.attention_shape(t, 0)),
        };
        let io = launch::AttentionIo { q: b.q, k: keys, v: values, key_start: b.key_start, out: b.att, stats: b.stats };
        launch::attention_forward(&self.ctx, enc, io, shape)
    }

    /// Attention of `t` queries at positions pos.. with the model's heads, scale and cap.
    pub(crate) fn attention_shape(&self, t: usize, pos: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            n_tokens: t,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            pos_offset: pos,
            key_base: 0,
            scale: c.query_scale,
            softcap: c.attn_softcap,
        }
    }

    /// [`Model::attention`] for rows that are each one token of their own sequence (layer l of
    /// a [`RowsPass`]): for each pool of caches ([`Model::new_caches_for`]), one dispatch writes
    /// its rows' keys and values at the next position of their caches and one runs their
    /// attention, each row over its own keys (within the window on a layer with one).
    fn rows_attention(&self, enc: &mut Encoder, l: usize, b: &BlockBuffers<'_>, rows: &RowsPass<'_>) -> Result<()> {
        let c = &self.config;
        let windowed = usize::from(c.layer_window(l).is_some());
        for g in &rows.groups {
            // Each row's token is the last key of its range in every layer's table.
            let at = launch::KvAt::RangeEnds(g.ranges[0]);
            let (k_cache, v_cache, n_rows) = (&g.k[l], &g.v[l], rows.rows);
            let w =
                launch::KvWrite { k: b.k, v: b.v, k_cache, v_cache, n_rows, width: c.num_kv_heads * c.head_dim, at };
            launch::kv_write(&self.ctx, enc, w)?;
            let key_start = g.ranges[windowed];
            let io = launch::AttentionIo { q: b.q, k: k_cache, v: v_cache, key_start, out: b.att, stats: b.stats };
            launch::attention_rows_forward(&self.ctx, enc, io, self.attention_shape(n_rows, 0), g.keys[windowed])?;
        }
        Ok(())
    }

    /// An attention or MLP branch added to the residual stream (`br.residual`: from, into):
    /// module `m`'s projection of `x`, added in the product's epilogue, or, where the layer has
    /// Gemma's norm after it, kept in `kept` (reported at its `stage`), normed into `b.xn` and
    /// added from there.
    fn branch<'b>(
        &self,
        enc: &mut Encoder,
        l: usize,
        br: Branch<'b>,
        b: &BlockBuffers<'b>,
        (lora, t, drop): (Option<&GpuAdapter>, usize, Option<Dropout<'_>>),
        after: &mut dyn FnMut(&mut Encoder, Stage) -> Result<()>,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let (from, into) = br.residual;
        let start_residual = |enc: &mut Encoder| {
            if from != into {
                enc.copy_buffer_to_buffer(from, 0, into, 0, (t * h * 4) as u64);
            }
        };
        let rows_lora = b.rows.map(|r| r.lora);
        let io = |y, add_to_y| LinearIo {
            x: br.x,
            y,
            add_to_y,
            h: br.lora_h,
            m: t,
            input: br.input,
            lora_h_at: None,
            rows_lora,
        };
        let Some(w) = br.post_norm else {
            start_residual(enc);
            return self.linear(enc, (l, br.module), lora, io(into, true), drop);
        };
        self.linear(enc, (l, br.module), lora, io(br.kept, false), drop)?;
        after(enc, br.stage)?;
        let eps = self.config.rms_norm_eps;
        launch::rms_norm_forward(&self.ctx, enc, launch::RmsNorm { x: br.kept, w, y: b.xn, n_rows: t, dim: h, eps })?;
        start_residual(enc);
        launch::add_forward(&self.ctx, enc, b.xn, into, t * h)
    }

    /// The RoPE table of layer l: the sliding-window layers' own where they have one.
    pub(crate) fn rope_table(&self, l: usize) -> &wgpu::Buffer {
        match &self.cos_sin_sliding {
            Some(sliding) if self.config.layer_window(l).is_some() => sliding,
            _ => &self.cos_sin,
        }
    }

    /// The MLP's gate: act(gate) * up with the model's activation.
    pub(crate) fn gate_forward(
        &self,
        enc: &mut Encoder,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        match self.config.hidden_act {
            Activation::Silu => launch::silu_mul_forward(&self.ctx, enc, gate, up, out, n),
            Activation::GeluTanh => launch::gelu_mul_forward(&self.ctx, enc, gate, up, out, n),
        }
    }

    /// [`Model::gate_forward`] as the op that a one-row product fuses into reading the gate.
    pub(crate) fn gated<'a>(&self, up: &'a wgpu::Buffer) -> launch::RowInput<'a> {
        match self.config.hidden_act {
            Activation::Silu => launch::RowInput::SiluMul { up },
            Activation::GeluTanh => launch::RowInput::GeluMul { up },
        }
    }

    /// The backward of [`Model::gate_forward`].
    pub(crate) fn gate_backward(&self, enc: &mut Encoder, g: launch::SiluMulGrad<'_>) -> Result<()> {
        match self.config.hidden_act {
            Activation::Silu => launch::silu_mul_backward(&self.ctx, enc, g),
            Activation::GeluTanh => launch::gelu_mul_backward(&self.ctx, enc, g),
        }
    }

    /// Logits (rows, vocab) for `rows` hidden states starting at row `first` of `hidden`.
    pub fn logits_gpu(
        &self,
        enc: &mut Encoder,
        hidden: &wgpu::Buffer,
        first: usize,
        rows: usize,
    ) -> Result<wgpu::Buffer> {
        let c = &self.config;
        let h = c.hidden_size;
        let x = self.ctx.storage_zeroed("lm_head x", rows * h);
        enc.copy_buffer_to_buffer(hidden, (first * h * 4) as u64, &x, 0, (rows * h * 4) as u64);
        let logits = self.ctx.storage_zeroed("logits", rows * c.vocab_size);
        self.record_logits(enc, &x, &logits, rows, None)?;
        Ok(logits)
    }

    /// Records logits (rows, vocab) of the first `rows` rows of `x` into `logits`, soft-capped
    /// where the model caps them: every path to logits (decoding, scoring, training's head).
    /// `input` is an op that the products fuse into reading x (one row: decoding's final norm).
    pub(crate) fn record_logits(
        &self,
        enc: &mut Encoder,
        x: &wgpu::Buffer,
        logits: &wgpu::Buffer,
        rows: usize,
        input: Option<launch::RowInput<'_>>,
    ) -> Result<()> {
        let c = &self.config;
        let table = self.lm_head.as_ref().unwrap_or(&self.embed);
        for (buf, start, n) in &table.chunks {
            let mm = launch::Matmul {
                x,
                w: table.weight(buf),
                bias: None,
                y: logits,
                m: rows,
                n: *n,
                k: table.dim,
                out: OutCols::at(c.vocab_size, *start),
            };
            match input {
                Some(input) => launch::matvec_fused_forward(
                    &self.ctx,
                    enc,
                    mm,
                    launch::Fused { input: Some(input), ..Default::default() },
                )?,
                None => launch::matmul_forward(&self.ctx, enc, mm)?,
            }
        }
        match c.final_softcap {
            Some(cap) => launch::logit_softcap(&self.ctx, enc, logits, rows * c.vocab_size, cap),
            None => Ok(()),
        }
    }

    /// Records the forward pass of `ids` and the logits of its last position, and returns the
    /// encoder and the logits buffer (the cache's own for one token).
    fn record_next_logits(
        &self,
        input: StepInput<'_>,
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
    ) -> Result<(Encoder, wgpu::Buffer)> {
        let (input, t) = match input {
            StepInput::Ids(ids) => {
                let last = self.prefill_leading_chunks(ids, cache, lora)?;
                (StepInput::Ids(last), last.len())
            }
            StepInput::Picked => (StepInput::Picked, 1),
        };
        // One token (decoding): the final norm rides in the LM head's products.
        let one = t == 1;
        let (mut enc, hidden) =
            self.record_hidden(input, cache, lora, if one { FinalNorm::Fused } else { FinalNorm::Written })?;
        let logits = if one {
            // A one-token pass ran in the cache's decoding buffers.
            let d = cache.decode.as_ref().ok_or_else(|| Error::Gpu("decode buffers missing".into()))?;
            let norm = launch::RowInput::RmsNorm { w: &self.final_norm, eps: self.config.rms_norm_eps };
            self.record_logits(&mut enc, &hidden, &d.logits, 1, Some(norm))?;
            d.logits.clone()
        } else {
            self.logits_gpu(&mut enc, &hidden, t - 1, 1)?
        };
        Ok((enc, logits))
    }

    /// Of a prompt longer than [`Model::prefill_chunk`], runs all but its last chunk (each pass
    /// at most that many tokens, submitted as it is recorded, adding to the cache what the next
    /// one attends to) and returns the last, at most a chunk and at least one token, for the pass
    /// that gives the logits. The whole prompt is checked first, so a prompt refused leaves the
    /// cache as it was.
    fn prefill_leading_chunks<'a>(
        &self,
        ids: &'a [u32],
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
    ) -> Result<&'a [u32]> {
        let chunk = self.pass_chunk(lora);
        if ids.len() <= chunk {
            return Ok(ids);
        }
        self.check_ids(ids, cache)?;
        let (leading, last) = ids.split_at((ids.len() - 1) / chunk * chunk);
        for part in leading.chunks(chunk) {
            let (enc, _) = self.record_hidden(StepInput::Ids(part), cache, lora, FinalNorm::Fused)?;
            self.ctx.submit([enc.finish()]);
        }
        Ok(last)
    }

    /// Runs `ids` and returns the logits of the last position.
    pub fn next_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.next_logits_with(ids, cache, None)
    }

    /// [`Model::next_logits`] with a LoRA adapter applied (not merged).
    /// One submission: the forward pass, the logits and their copy back.
    pub fn next_logits_with(&self, ids: &[u32], cache: &mut KvCache, lora: Option<&GpuAdapter>) -> Result<Vec<f32>> {
        let (enc, logits) = self.record_next_logits(StepInput::Ids(ids), cache, lora)?;
        self.ctx.read_f32_after(enc, &logits, self.config.vocab_size)
    }

    /// Words of the partials of choosing from `v` logits by argmax or by top-k.
    fn pick_partials(&self, v: usize) -> usize {
        (2 * launch::argmax_groups(v)).max(launch::top_k_partials(v, launch::MAX_TOP_K))
    }

    /// Runs `ids`, chooses from the logits of the last position on the GPU with `pick`, and
    /// reads back `words` words of the result: one submission. A one-token pass uses the
    /// cache's buffers and creates nothing after the cache's first.
    fn next_picked(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
        words: usize,
        pick: impl FnOnce(&mut Encoder, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let (mut enc, logits) = self.record_next_logits(StepInput::Ids(ids), cache, lora)?;
        let owned;
        let (partials, picked) = match (&cache.decode, ids.len()) {
            (Some(d), 1) => (&d.pick_partials, &d.picked),
            _ => {
                owned = (
                    self.ctx.storage_zeroed("pick partials", self.pick_partials(self.config.vocab_size)),
                    self.ctx.storage_zeroed("picked", 2 * launch::MAX_TOP_K),
                );
                (&owned.0, &owned.1)
            }
        };
        pick(&mut enc, &logits, partials, picked)?;
        Ok(self.ctx.read_f32_after(enc, picked, words)?.into_iter().map(f32::to_bits).collect())
    }

    /// Runs `ids` and returns the most likely next token, chosen on the GPU (the first of equal
    /// maxima, as greedy sampling on the CPU chooses): one id read back instead of a row of
    /// logits.
    pub fn next_argmax_with(&self, ids: &[u32], cache: &mut KvCache, lora: Option<&GpuAdapter>) -> Result<u32> {
        let v = self.config.vocab_size;
        let ctx = &self.ctx;
        let out = self.next_picked(ids, cache, lora, 1, |enc, logits, partials, picked| {
            launch::argmax(ctx, enc, logits, partials, picked, v)
        })?;
        // A one-token pass picked into the cache's own buffer, which a next step can read.
        cache.argmax_picked = ids.len() == 1;
        Ok(out[0])
    }

    /// Submits a one-token step of `cache` whose token is `token`, with its argmax (as
    /// [`Model::next_argmax_with`] picks it), and starts reading the id it picks back into
    /// `staging` (4 bytes at least, [`GpuContext::staging`]) without waiting:
    /// [`GpuContext::finish_read`] returns it as its first word. With [`StepToken::Picked`] the
    /// step's token is the one the cache's previous step picked, copied on the GPU, so the next
    /// step can be submitted before the host has read the last one back and the GPU runs the
    /// steps back to back (greedy decoding in [`crate::infer::generate`]); that needs the cache's
    /// last pass to be a one-token step that picked by argmax (this or
    /// [`Model::next_argmax_with`]), else it is refused. Until the read is finished, `staging`
    /// must not be used again.
    pub fn submit_argmax(
        &self,
        token: StepToken,
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
        staging: &wgpu::Buffer,
    ) -> Result<crate::gpu::PendingRead> {
        self.ctx.check()?;
        let input = match &token {
            StepToken::Id(id) => StepInput::Ids(std::slice::from_ref(id)),
            StepToken::Picked => StepInput::Picked,
        };
        let (mut enc, logits) = self.record_next_logits(input, cache, lora)?;
        let d = cache.decode.as_ref().ok_or_else(|| Error::Gpu("decode buffers missing".into()))?;
        launch::argmax(&self.ctx, &mut enc, &logits, &d.pick_partials, &d.picked, self.config.vocab_size)?;
        enc.copy_buffer_to_buffer(&d.picked, 0, staging, 0, 4);
        cache.argmax_picked = true;
        Ok(self.ctx.submit_and_map(enc, staging, 4))
    }

    /// Runs `ids` and returns the `k` (at most [`launch::MAX_TOP_K`]) most likely next tokens
    /// with their logits, chosen on the GPU: highest first, the lower id first among equal
    /// logits, as the CPU sampler orders them; fewer when the vocabulary is smaller.
    pub fn next_top_k_with(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&GpuAdapter>,
        k: usize,
    ) -> Result<Vec<(u32, f32)>> {
        let v = self.config.vocab_size;
        let ctx = &self.ctx;
        let out = self.next_picked(ids, cache, lora, 2 * k, |enc, logits, partials, picked| {
            launch::top_k(ctx, enc, logits, partials, picked, v, k)
        })?;
        Ok(out.chunks(2).filter(|p| p[1] != u32::MAX).map(|p| (p[1], f32::from_bits(p[0]))).collect())
    }

    /// Logits for every position of `ids` (T, vocab), from a fresh cache.
    pub fn all_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.all_logits_with(ids, None)
    }

    /// [`Model::all_logits`] with a LoRA adapter applied (not merged). The logits are formed
    /// and read back [`Model::logit_rows`] rows at a time, so that no buffer of them exceeds the
    /// binding limit.
    pub fn all_logits_with(&self, ids: &[u32], lora: Option<&GpuAdapter>) -> Result<Vec<f32>> {
        let mut cache = self.new_cache_for(ids.len())?;
        let hidden = self.forward_hidden_with(ids, &mut cache, lora)?;
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(ids.len() * v);
        let chunk = self.logit_rows();
        for start in (0..ids.len()).step_by(chunk) {
            let rows = chunk.min(ids.len() - start);
            let mut enc = self.ctx.encoder();
            let logits = self.logits_gpu(&mut enc, &hidden, start, rows)?;
            self.ctx.submit([enc.finish()]);
            out.extend(self.ctx.read_f32(&logits, rows * v)?);
        }
        Ok(out)
    }

    /// Rows of logits formed at once outside training (scoring, [`Model::all_logits`]): at most
    /// 256, and no more than one binding holds.
    pub fn logit_rows(&self) -> usize {
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        (limit / (self.config.vocab_size * 4)).clamp(1, 256)
    }

    /// Mean next-token cross-entropy of `ids` (each position predicts the next), as
    /// transformers' `labels=ids` computes it. Logits are formed in row chunks so that no
    /// buffer exceeds the binding limit.
    pub fn mean_loss(&self, ids: &[u32]) -> Result<f32> {
        self.mean_loss_with(ids, None)
    }

    /// [`Model::mean_loss`] with a LoRA adapter applied (not merged).
    pub fn mean_loss_with(&self, ids: &[u32], lora: Option<&GpuAdapter>) -> Result<f32> {
        let losses = self.token_losses_with(ids, lora)?;
        Ok((losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64) as f32)
    }

    /// The loss of each next token of `ids`: entry i scores `ids[i + 1]` given `ids[..=i]`.
    pub fn token_losses_with(&self, ids: &[u32], lora: Option<&GpuAdapter>) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(Error::invalid("text", "needs at least two tokens to score"));
        }
        let mut cache = self.new_cache_for(ids.len())?;
        let hidden = self.forward_hidden_with(ids, &mut cache, lora)?;
        let v = self.config.vocab_size;
        let chunk = self.logit_rows();
        let n = ids.len() - 1;
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let rows = chunk.min(n - start);
            let mut enc = self.ctx.encoder();
            let logits = self.logits_gpu(&mut enc, &hidden, start, rows)?;
            let targets = self.ctx.storage_from("targets", &ids[start + 1..start + 1 + rows]);
            let loss = self.ctx.storage_zeroed("loss", rows);
            launch::cross_entropy_forward(
                &self.ctx,
                &mut enc,
                launch::CrossEntropy {
                    logits: &logits,
                    targets: &targets,
                    loss: &loss,
                    n_rows: rows,
                    vocab: v,
                    softcap: self.config.final_softcap,
                },
            )?;
            self.ctx.submit([enc.finish()]);
            out.extend(self.ctx.read_f32(&loss, rows)?);
            start += rows;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values spread evenly over (-scale / 2, scale / 2), from a seeded LCG.
    fn test_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// Stored values read in pieces across the cores (as a table's chunks are) are the tensor
    /// dequantized whole, in every stored form, from a row's start past the first piece; a
    /// piece that starts inside a block is an error, not values from the wrong place.
    #[test]
    fn stored_values_read_in_pieces_are_the_tensor_dequantized_whole() {
        let n = 3 * (1 << 16) + 4 * 256;
        let values = test_values(n, 0x2545_f491_4f6c_dd1du64, 4.0);
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            let bytes = crate::quant::gguf_blocks::quantize(ty, &values).expect("a type with a writer");
            let whole = crate::quant::gguf_blocks::dequantize(ty, &bytes, n).expect("whole blocks");
            let source = Floats::Stored(ty, Cow::Borrowed(&bytes));
            // From the start of a row of 1,024 values, past three pieces of 64 Ki.
            let first = 1024;
            let mut got = vec![0f32; n - first];
            source.read_as(first, &mut got, |v, o| o.copy_from_slice(v)).expect("whole blocks");
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != whole[first + i].to_bits()) {
                panic!("{}: value {} is {}, dequantized whole {}", ty.name(), first + i, got[i], whole[first + i]);
            }
            if ty != GgmlType::F32 && ty != GgmlType::F16 {
                let e = source.read(16, &mut [0f32; 32]).expect_err("inside a block");
                assert!(e.contains("starts no"), "{e}");
            }
        }
    }

    /// A linear weight quantized to NF4 from its stored values a chunk at a time, in runs on
    /// the cores, is NF4 of the values dequantized whole, byte for byte, in every stored form
    /// (super-blocks of 256 included) and past the size quantized on one thread.
    #[test]
    fn nf4_from_stored_values_is_nf4_of_the_values_dequantized_whole() {
        // An odd number of rows, so that runs of NF4 blocks cut evenly would end inside
        // super-blocks of 256.
        let (rows, cols) = (1101, 1024);
        let values = test_values(rows * cols, 0x9e37_79b9_7f4a_7c15u64, 0.1);
        for ty in [GgmlType::Bf16, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K] {
            let bytes = crate::quant::gguf_blocks::quantize(ty, &values).expect("a type with a writer");
            let whole = crate::quant::gguf_blocks::dequantize(ty, &bytes, rows * cols).expect("whole blocks");
            let want = nf4::quantize(&whole, &[rows, cols], 64).expect("valid");
            let got = Floats::Stored(ty, Cow::Borrowed(&bytes)).nf4(&[rows, cols], 64).expect("valid");
            let same_absmax = got.absmax.iter().zip(&want.absmax).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(got.packed == want.packed && same_absmax, "{}: NF4 differs from the whole tensor's", ty.name());
        }
    }

    /// The fingerprint's samples, gathered in runs on the cores from the blocks they fall in,
    /// are every 61st value of the tensor dequantized whole, in order: F32, BF16 and blocks of
    /// 32 and 256 values, over 3,000,064 values (4 runs, the last short).
    #[test]
    fn sampled_values_are_every_61st_of_the_tensor_dequantized_whole() {
        let n = 3_000_064;
        let values = test_values(n, 7, 0.1);
        for ty in [GgmlType::F32, GgmlType::Bf16, GgmlType::Q8_0, GgmlType::Q4K] {
            let bytes = crate::quant::gguf_blocks::quantize(ty, &values).expect("a type with a writer");
            let whole = crate::quant::gguf_blocks::dequantize(ty, &bytes, n).expect("whole blocks");
            let want: Vec<u32> = whole.iter().step_by(FINGERPRINT_STRIDE).map(|v| v.to_bits()).collect();
            let got = sampled_bits(ty, &bytes, n).expect("whole blocks");
            assert_eq!(got.len(), want.len(), "{}: samples", ty.name());
            if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                panic!("{}: sample {i} is {:#010x}, the whole tensor's {:#010x}", ty.name(), got[i], want[i]);
            }
        }
        let e = sampled_bits(GgmlType::Q8_0, &[0; 34], 64).expect_err("one block for two");
        assert!(e.contains("Q8_0"), "{e}");
    }
}
