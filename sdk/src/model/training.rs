//! The training pass of a Llama-family model with a LoRA adapter: forward over a packed batch,
//! the fused cross-entropy, and the hand-written backward in reverse, recorded into one command
//! encoder. Every buffer is planned up front in a [`Workspace`] sized for the largest batch.
//!
//! Gradients flow to the LoRA matrices only: the base weights are frozen, so their matmuls
//! compute dX and nothing else. With gradient checkpointing the workspace keeps each layer's
//! input and one set of layer activations, and each layer's forward runs again just before its
//! backward.
//!
//! With f16 activations ([`Precision::F16`]) the activations saved for the backward pass (the
//! layer inputs and, without checkpointing, every layer's activations) are stored as f16 and
//! read back into one f32 set before each layer's backward. Arithmetic, the LoRA weights, their
//! gradients and the optimizer stay f32. Each saved tensor is rounded in place as it is stored,
//! before anything else reads it, so the forward pass computes with exactly the values the
//! backward pass reads, and the gradients are those of the rounded forward.

use std::cell::Cell;

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::launch::{self, AttentionGrads, AttentionIo, DyCols, OutCols, RopeShape, Weight};
use crate::gpu::{BindGroups, Encoder};
use crate::lora::{GpuAdapter, Module};
use crate::model::config::ModelConfig;
use crate::model::llama::{BlockBuffers, Dropout, LoraH, Model, Stage};

/// A packed batch: samples laid end to end, each attending only to itself, with positions
/// restarting at 0 for every sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Token ids of every sample, end to end.
    pub ids: Vec<u32>,
    /// The token each position predicts, or `u32::MAX` where there is no loss.
    pub targets: Vec<u32>,
    /// Each token's position within its sample.
    pub positions: Vec<u32>,
    /// First token of each token's sample.
    pub key_start: Vec<u32>,
    /// Seed of this batch's LoRA dropout masks (unused without dropout).
    pub seed: u32,
    /// Preference pairs (DPO), [`launch::DPO_SPAN`] words each: the chosen sequence's rows
    /// `[w0, w1)`, the rejected one's `[w2, w3)`, and the scored tokens of each (w4, w5). Empty
    /// for supervised batches.
    pub pairs: Vec<[u32; 6]>,
}

impl Batch {
    /// Packs samples given as (token ids, train flags): `train[i]` says that token i is a target
    /// (the loss counts predicting it from tokens 0..i), as transformers' labels != -100.
    pub fn pack<'a>(samples: impl IntoIterator<Item = (&'a [u32], &'a [bool])>) -> Result<Batch> {
        Batch::pack_units(samples.into_iter().map(|(ids, train)| (ids, train, None)))
    }

    /// Packs samples of one sequence or of a preference pair: (ids, train flags, `Some(k)`
    /// where a pair's rejected sequence starts in them). The two sequences of a pair are packed
    /// as two samples, and the pair is recorded in [`Batch::pairs`]. A batch holds pairs only or
    /// no pair.
    pub fn pack_units<'a>(units: impl IntoIterator<Item = (&'a [u32], &'a [bool], Option<usize>)>) -> Result<Batch> {
        let mut b = Batch::default();
        let mut singles = 0;
        for (n, (ids, train, rejected_at)) in units.into_iter().enumerate() {
            if ids.len() != train.len() {
                return Err(Error::invalid(
                    "sample",
                    format!("sample {n}: {} ids but {} train flags", ids.len(), train.len()),
                ));
            }
            let Some(k) = rejected_at else {
                singles += 1;
                b.push(ids, train);
                continue;
            };
            if k == 0 || k >= ids.len() {
                return Err(Error::invalid(
                    "sample",
                    format!("sample {n}: a pair's rejected sequence starts at {k} of {} tokens", ids.len()),
                ));
            }
            let (c0, nc) = b.push(&ids[..k], &train[..k]);
            let (r0, nr) = b.push(&ids[k..], &train[k..]);
            b.pairs.push([c0, r0, r0, b.ids.len() as u32, nc, nr]);
        }
        if singles > 0 && !b.pairs.is_empty() {
            return Err(Error::invalid("batch", "mixes preference pairs with single samples"));
        }
        Ok(b)
    }

    /// Appends one sequence; returns its first row and its scored tokens.
    fn push(&mut self, ids: &[u32], train: &[bool]) -> (u32, u32) {
        let start = self.ids.len() as u32;
        let mut scored = 0;
        for (i, &id) in ids.iter().enumerate() {
            self.ids.push(id);
            self.positions.push(i as u32);
            self.key_start.push(start);
            let next = i + 1;
            let target = if next < ids.len() && train[next] { ids[next] } else { u32::MAX };
            scored += u32::from(target != u32::MAX);
            self.targets.push(target);
        }
        (start, scored)
    }

    /// Tokens in the batch.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions that carry a loss.
    pub fn n_scored(&self) -> usize {
        self.targets.iter().filter(|&&t| t != u32::MAX).count()
    }
}

/// Where a DPO pass takes the reference's log-probabilities from.
#[derive(Debug, Clone, Copy)]
pub enum Reference<'a> {
    /// Computed ahead (with [`Model::pair_logps`]): (chosen, rejected) per pair of the batch.
    Given(&'a [f32]),
    /// Computed in the pass, by a forward pass with this adapter (the frozen starting one).
    Adapter(&'a GpuAdapter),
}

/// A DPO pass: the loss and the reference.
#[derive(Debug, Clone, Copy)]
pub struct DpoPass<'a> {
    /// The loss as the kernel computes it.
    pub loss: launch::DpoLoss,
    /// Where the reference's log-probabilities come from.
    pub reference: Reference<'a>,
}

/// How a training step stores the activations it saves for its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32, as computed.
    #[default]
    F32,
    /// f16 (mixed precision): half the bytes, rounded to f16's 11 significant bits. Arithmetic,
    /// LoRA weights, gradients and optimizer state stay f32. Needs no optional GPU feature.
    F16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            _ => Err(Error::invalid("activation precision", format!("expected f32 or f16, got {s:?}"))),
        }
    }
}

/// What a training [`Workspace`] is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspacePlan {
    /// Tokens of the largest packed batch.
    pub capacity: usize,
    /// The largest LoRA rank.
    pub rank: usize,
    /// Keep only each layer's input and recompute the layer before its backward.
    pub checkpointing: bool,
    /// Room for LoRA dropout: the masked adapter input and its gradient, (T, widest input) each.
    pub dropout: bool,
    /// Storage of the saved activations.
    pub activations: Precision,
}

impl WorkspacePlan {
    /// Batches of up to `capacity` tokens, rank up to `rank`; no checkpointing, no dropout, f32.
    pub fn new(capacity: usize, rank: usize) -> Self {
        WorkspacePlan { capacity, rank, checkpointing: false, dropout: false, activations: Precision::F32 }
    }
}

/// What a module read in the forward pass, for its backward ([`Model::linear_backward`]).
#[derive(Clone, Copy)]
struct ModuleInput<'a> {
    /// Its input x.
    x: &'a wgpu::Buffer,
    /// The op through which it read x (down_proj reads the gated activation of the gate in x).
    gated: Option<launch::RowInput<'a>>,
    /// Where the forward pass left its x A^T; recomputed where `None` or dropout is on.
    h: Option<&'a wgpu::Buffer>,
}

/// The rows a group of modules read after a norm (q, k and v; gate and up), as the backward
/// pass reads them: the norm's input x, its weight and each row's 1 / rms that the forward pass
/// kept, so that the rows are `w * (x * inv_rms)` without being written again.
#[derive(Clone, Copy)]
struct NormedRows<'a> {
    x: &'a wgpu::Buffer,
    w: &'a wgpu::Buffer,
    inv_rms: &'a wgpu::Buffer,
}

/// Activations of one layer that the backward pass reads. In a saved f16 set every tensor but
/// `stats` and `inv_rms` hold packed halves (two per u32).
#[derive(Debug)]
struct LayerActs {
    q: wgpu::Buffer,     // (T, H*hd) after RoPE
    k: wgpu::Buffer,     // (T, Hkv*hd) after RoPE
    v: wgpu::Buffer,     // (T, Hkv*hd)
    att: wgpu::Buffer,   // (T, H*hd) attention output
    stats: wgpu::Buffer, // (T*H, 2) log-sum-exp and delta, always f32
    x_mid: wgpu::Buffer, // (T, C) residual stream after attention
    gate: wgpu::Buffer,  // (T, I)
    up: wgpu::Buffer,    // (T, I)
    /// q and k before their per-head norms, (T, H*hd) and (T, Hkv*hd), for a model with them
    /// (Qwen3); one float each otherwise.
    q_raw: wgpu::Buffer,
    k_raw: wgpu::Buffer,
    /// The o and down projections' outputs (T, C) before Gemma's norms after attention and
    /// the MLP; one float each otherwise.
    attn_out: wgpu::Buffer,
    mlp_out: wgpu::Buffer,
    /// The LoRA products x A^T of q, k and v (T, 3r), o (T, r), gate and up (T, 2r) and down
    /// (T, r), as the forward pass computed them (without dropout), for the dB products.
    h_qkv: wgpu::Buffer,
    h_o: wgpu::Buffer,
    h_gate_up: wgpu::Buffer,
    h_down: wgpu::Buffer,
    /// Each row's 1 / rms in the attention norm and the MLP norm (T each, always f32), kept by
    /// the forward pass so that the A gradients after them read the normed rows through the
    /// norm (`RowInput::RmsNormKept`) rather than have them written again.
    inv_rms: [wgpu::Buffer; 2],
}

impl LayerActs {
    /// The tensors other than `stats` and `inv_rms`, each with the stage after which it is
    /// complete, in the order of [`Model::act_sizes`]: q_raw and k_raw only for a model with q/k
    /// norms, attn_out and mlp_out only for one with norms after attention and the MLP.
    fn tensors(&self, c: &ModelConfig) -> Vec<(Stage, &wgpu::Buffer)> {
        let mut all = vec![
            (Stage::Qkv, &self.q),
            (Stage::Qkv, &self.k),
            (Stage::Qkv, &self.v),
            (Stage::Attention, &self.att),
            (Stage::Mid, &self.x_mid),
            (Stage::GateUp, &self.gate),
            (Stage::GateUp, &self.up),
            (Stage::Qkv, &self.h_qkv),
            (Stage::Mid, &self.h_o),
            (Stage::GateUp, &self.h_gate_up),
            (Stage::Out, &self.h_down),
        ];
        if c.qk_norm {
            all.extend([(Stage::QkRaw, &self.q_raw), (Stage::QkRaw, &self.k_raw)]);
        }
        if c.sandwich_norms {
            all.extend([(Stage::AttnOut, &self.attn_out), (Stage::MlpOut, &self.mlp_out)]);
        }
        all
    }
}

/// Every buffer of a training step, allocated once for batches of up to `capacity` tokens.
#[derive(Debug)]
pub struct Workspace {
    /// The most tokens a batch may have.
    pub capacity: usize,
    /// Whether layer inputs alone are kept and the rest recomputed in the backward pass.
    pub checkpointing: bool,
    /// How saved activations are stored.
    pub activations: Precision,
    ids: wgpu::Buffer,
    targets: wgpu::Buffer,
    positions: wgpu::Buffer,
    key_start: wgpu::Buffer,
    /// The first key each token sees on a layer with a sliding window (one float without).
    window_start: wgpu::Buffer,
    /// Layer inputs as saved (f32, or packed f16). With f32 activations x_in[L] is the last
    /// layer's output; with f16 the head reads that from the f32 stream, so it is not saved.
    x_in: Vec<wgpu::Buffer>,
    /// f32 activations: every layer's (f32, no checkpointing), or one layer's, the one being
    /// computed or read back.
    acts: Vec<LayerActs>,
    /// f16 activations without checkpointing: every layer's, packed.
    saved: Vec<LayerActs>,
    /// With f16 activations, the f32 residual stream: layer l reads x_cur (even l) or x_tmp
    /// (odd l) and writes the other.
    x_cur: wgpu::Buffer,
    x_tmp: wgpu::Buffer,
    xn: wgpu::Buffer,
    act: wgpu::Buffer,
    lora_h: wgpu::Buffer,
    lora_dh: wgpu::Buffer,
    /// LoRA dropout: the masked adapter input and the masked input gradient (T, widest n_in);
    /// one float each when the workspace was planned without dropout.
    lora_x: wgpu::Buffer,
    lora_dx: wgpu::Buffer,
    d_res: wgpu::Buffer,
    d_xn: wgpu::Buffer,
    d_act: wgpu::Buffer,
    d_gate: wgpu::Buffer,
    d_up: wgpu::Buffer,
    d_att: wgpu::Buffer,
    dq: wgpu::Buffer,
    dk: wgpu::Buffer,
    dv: wgpu::Buffer,
    /// The gradients of q and k before their per-head norms (Qwen3); one float each otherwise.
    dq_raw: wgpu::Buffer,
    dk_raw: wgpu::Buffer,
    head_rows: usize,
    head_x: wgpu::Buffer,
    head_dx: wgpu::Buffer,
    head_targets: wgpu::Buffer,
    head_loss: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// Per-token loss of the last batch (T).
    pub loss: wgpu::Buffer,
    /// DPO: the pairs of the batch ([`launch::DPO_SPAN`] u32 words each, for up to T / 2 pairs).
    dpo_spans: wgpu::Buffer,
    /// DPO: each pair's reference log-probabilities (chosen, rejected).
    pub dpo_reference: wgpu::Buffer,
    /// DPO: each pair's loss, rewards and log-probabilities ([`launch::DPO_STATS`] floats a pair).
    pub dpo_stats: wgpu::Buffer,
    /// DPO: the loss's derivative by each row's cross-entropy (T).
    dpo_weights: wgpu::Buffer,
    /// Bytes of all of the above, as allocated.
    pub bytes: u64,
    /// The bind groups of the steps recorded over these buffers (see [`Workspace::binds`]).
    binds: Arc<BindGroups>,
}

impl Workspace {
    /// The bind groups of this workspace's dispatches, made during the first step and reused by
    /// every later one: record steps into `ctx.encoder_with(ws.binds())`.
    pub fn binds(&self) -> &Arc<BindGroups> {
        &self.binds
    }

    /// The cross-entropy over the head's first `rows` rows of logits.
    fn head_cross_entropy(&self, rows: usize, vocab: usize, softcap: Option<f32>) -> launch::CrossEntropy<'_> {
        launch::CrossEntropy {
            logits: &self.logits,
            targets: &self.head_targets,
            loss: &self.head_loss,
            n_rows: rows,
            vocab,
            softcap,
        }
    }

    /// The first visible key of each token on layer l: within its sample, and within the
    /// window on a layer with one.
    fn key_start_of(&self, c: &ModelConfig, l: usize) -> &wgpu::Buffer {
        if c.layer_window(l).is_some() { &self.window_start } else { &self.key_start }
    }

    fn half(&self) -> bool {
        self.activations == Precision::F16
    }

    /// The f32 buffer that holds layer l's input during the forward pass (l = L: the last
    /// layer's output).
    fn stream(&self, l: usize) -> &wgpu::Buffer {
        match (self.half(), l % 2) {
            (false, _) => &self.x_in[l],
            (true, 0) => &self.x_cur,
            (true, _) => &self.x_tmp,
        }
    }

    /// Where layer l's forward writes its activations, and the f16 set that keeps them.
    fn forward_acts(&self, l: usize, keep: bool) -> (&LayerActs, Option<&LayerActs>) {
        match (self.checkpointing || !keep, self.half()) {
            (true, _) => (&self.acts[0], None),
            (false, true) => (&self.acts[0], Some(&self.saved[l])),
            (false, false) => (&self.acts[l], None),
        }
    }
}

impl Model {
    /// Elements of the tensors of [`LayerActs::tensors`] for `t` tokens and LoRA rank `r`.
    fn act_sizes(&self, t: usize, r: usize) -> Vec<usize> {
        let c = &self.config;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let tr = t * r.max(1);
        let mut sizes = vec![t * qd, t * kvd, t * kvd, t * qd, t * h, t * i, t * i, 3 * tr, tr, 2 * tr, tr];
        if c.qk_norm {
            sizes.extend([t * qd, t * kvd]);
        }
        if c.sandwich_norms {
            sizes.extend([t * h, t * h]);
        }
        sizes
    }

    /// The most tokens one training batch can hold with LoRA rank up to `rank` and, where
    /// `dropout`, room for LoRA dropout's masked inputs: [`Model::max_pass_tokens`] for the
    /// widest row a training pass binds.
    pub fn max_batch_tokens(&self, rank: usize, dropout: bool) -> usize {
        self.max_pass_tokens(rank, if dropout { self.widest_input() } else { 0 })
    }

    /// The widest input of an adapted module (hidden, MLP or query width): a row of LoRA
    /// dropout's masked input.
    fn widest_input(&self) -> usize {
        let c = &self.config;
        c.hidden_size.max(c.intermediate_size).max(c.num_heads * c.head_dim)
    }

    fn head_rows(&self, capacity: usize) -> usize {
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        capacity.min(128).min((limit / (self.config.vocab_size * 4)).max(1))
    }

    /// Allocates the buffers of a training step as `plan` says. Its `bytes` are what was
    /// allocated, so it is also the memory estimate.
    pub fn workspace(&self, plan: WorkspacePlan) -> Result<Workspace> {
        self.build_workspace(plan, false)
    }

    /// The GPU bytes [`Model::workspace`] would allocate for `plan`, without allocating them.
    pub fn workspace_bytes(&self, plan: WorkspacePlan) -> Result<u64> {
        Ok(self.build_workspace(plan, true)?.bytes)
    }

    /// Sizes the workspace's buffers and, unless `dry`, allocates them (a dry run hands out one
    /// placeholder buffer for all of them).
    fn build_workspace(&self, plan: WorkspacePlan, dry: bool) -> Result<Workspace> {
        let WorkspacePlan { capacity, rank, checkpointing, dropout, activations } = plan;
        if capacity == 0 {
            return Err(Error::invalid("batch capacity", "must be at least one token"));
        }
        if capacity > self.max_context.max(1) * 64 {
            return Err(Error::invalid(
                "batch capacity",
                format!("{capacity} tokens is more than this model can pack"),
            ));
        }
        let c = &self.config;
        let ctx = &self.ctx;
        let (t, h, i) = (capacity, c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let wide = self.widest_input();
        let most = self.max_batch_tokens(rank, dropout);
        if capacity > most {
            return Err(Error::invalid(
                "batch capacity",
                format!(
                    "{capacity} tokens in one pass; this model trains at most {most} a pass on this GPU (grids of \
                     65,535 workgroups, bindings of max_storage_buffer_binding_size): lower batch_tokens, or \
                     data.max_len where one record is longer"
                ),
            ));
        }
        let half = activations == Precision::F16;
        let bytes = Cell::new(0u64);
        let placeholder = dry.then(|| ctx.storage_zeroed("workspace plan", 1));
        let z = |label: &str, n: usize| {
            bytes.set(bytes.get() + crate::gpu::dispatch::storage_bytes(n));
            match &placeholder {
                Some(p) => p.clone(),
                None => ctx.storage_zeroed(label, n),
            }
        };
        // A saved tensor of n values: f32, or n / 2 words of two halves.
        let saved = |label: &str, n: usize| z(label, if half { n.div_ceil(2) } else { n });
        let layer_acts = |kept: &dyn Fn(&str, usize) -> wgpu::Buffer| {
            let sizes = self.act_sizes(t, rank);
            let (q, k, v, att, x_mid, gate, up) =
                (sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6]);
            let (h_qkv, h_o, h_gate_up, h_down) = (sizes[7], sizes[8], sizes[9], sizes[10]);
            let raw = |label: &str, n: usize| if c.qk_norm { kept(label, n) } else { z(label, 1) };
            let out = |label: &str| if c.sandwich_norms { kept(label, t * h) } else { z(label, 1) };
            LayerActs {
                q: kept("q", q),
                k: kept("k", k),
                v: kept("v", v),
                att: kept("att", att),
                stats: z("attention stats", t * c.num_heads * 2),
                x_mid: kept("x mid", x_mid),
                gate: kept("gate", gate),
                up: kept("up", up),
                q_raw: raw("q before its norm", t * qd),
                k_raw: raw("k before its norm", t * kvd),
                attn_out: out("attention output before its norm"),
                mlp_out: out("MLP output before its norm"),
                h_qkv: kept("lora h of q, k and v", h_qkv),
                h_o: kept("lora h of o", h_o),
                h_gate_up: kept("lora h of gate and up", h_gate_up),
                h_down: kept("lora h of down", h_down),
                inv_rms: [z("attention norm 1/rms", t), z("MLP norm 1/rms", t)],
            }
        };
        let n_f32 = if checkpointing || half { 1 } else { c.num_layers };
        let n_saved = if half && !checkpointing { c.num_layers } else { 0 };
        let head_rows = self.head_rows(capacity);
        let mut ws = Workspace {
            capacity,
            checkpointing,
            activations,
            ids: z("ids", t),
            targets: z("targets", t),
            positions: z("positions", t),
            key_start: z("key start", t),
            window_start: z("window start", if c.sliding_window.is_some() { t } else { 1 }),
            x_in: (0..c.num_layers + usize::from(!half)).map(|_| saved("layer input", t * h)).collect(),
            acts: (0..n_f32).map(|_| layer_acts(&z)).collect(),
            saved: (0..n_saved).map(|_| layer_acts(&saved)).collect(),
            x_cur: z("x cur", if half { t * h } else { 1 }),
            x_tmp: z("x tmp", t * h),
            xn: z("xn", t * h),
            act: z("act", t * i),
            // Room for the x A^T of q, k and v at once (one product: Model::lora_a_shared).
            lora_h: z("lora h", 3 * t * rank.max(1)),
            lora_dh: z("lora dh", 3 * t * rank.max(1)),
            lora_x: z("lora dropout x", if dropout { t * wide } else { 1 }),
            lora_dx: z("lora dropout dx", if dropout { t * wide } else { 1 }),
            d_res: z("d residual", t * h),
            d_xn: z("d xn", t * h),
            d_act: z("d act", t * i),
            d_gate: z("d gate", t * i),
            d_up: z("d up", t * i),
            d_att: z("d att", t * qd),
            dq: z("dq", t * qd),
            dk: z("dk", t * kvd),
            dv: z("dv", t * kvd),
            dq_raw: z("dq before the norm", if c.qk_norm { t * qd } else { 1 }),
            dk_raw: z("dk before the norm", if c.qk_norm { t * kvd } else { 1 }),
            head_rows,
            head_x: z("head x", head_rows * h),
            head_dx: z("head dx", head_rows * h),
            head_targets: z("head targets", head_rows),
            head_loss: z("head loss", head_rows),
            logits: z("logits", head_rows * c.vocab_size),
            loss: z("loss", t),
            dpo_spans: z("dpo pairs", t.div_ceil(2) * launch::DPO_SPAN),
            dpo_reference: z("dpo reference log-probabilities", t.div_ceil(2) * 2),
            dpo_stats: z("dpo statistics", t.div_ceil(2) * launch::DPO_STATS),
            dpo_weights: z("dpo row weights", t),
            bytes: 0,
            binds: BindGroups::new(),
        };
        ws.bytes = bytes.get();
        Ok(ws)
    }

    /// Records the forward and backward pass of `batch` into `enc`: per-token losses land in
    /// `ws.loss`, and the LoRA gradients of the mean loss times `grad_scale * n_scored` (so
    /// `grad_scale = 1 / n_scored` gives the mean over this batch; over an accumulation of
    /// batches, 1 / their total) are ADDED to `grads` (the flat buffer matching `lora`).
    pub fn forward_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        batch: &Batch,
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        grad_scale: f32,
    ) -> Result<()> {
        let drop = self.dropout(ws, batch, lora)?;
        let t = self.forward_layers(enc, ws, batch, lora, true, drop)?;
        self.head_backward(enc, ws, t, grad_scale, false)?;
        self.layers_backward(enc, ws, t, lora, grads, drop)
    }

    /// Records a DPO step over `batch` (preference pairs only, see [`Batch::pack_units`]): the
    /// reference's log-probabilities as `dpo.reference` says, the policy's forward pass with
    /// `lora`, each pair's loss and statistics into `ws.dpo_stats`, and the LoRA gradients of
    /// `grad_scale` times the summed pair losses ADDED to `grads` (`grad_scale = 1 / pairs` of
    /// the step gives TRL's mean). The policy's per-row cross-entropies land in `ws.loss`.
    ///
    /// Its cost over a supervised step: the head's logits are computed twice (once for the
    /// losses every pair's weights need, once for the backward), and a reference computed in
    /// the step is one more forward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_dpo(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        batch: &Batch,
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        dpo: DpoPass<'_>,
        grad_scale: f32,
    ) -> Result<()> {
        self.write_pairs(ws, batch)?;
        self.reference_logps(enc, ws, batch, dpo.reference)?;
        let drop = self.dropout(ws, batch, lora)?;
        let t = self.forward_layers(enc, ws, batch, lora, true, drop)?;
        self.head_loss(enc, ws, t)?;
        self.dpo_loss(enc, ws, batch, dpo.loss, grad_scale)?;
        self.head_backward(enc, ws, t, 1.0, true)?;
        self.layers_backward(enc, ws, t, lora, grads, drop)
    }

    /// Records DPO's forward pass only (no gradient, no dropout): each pair's loss and
    /// statistics into `ws.dpo_stats`. For evaluation.
    pub fn forward_dpo(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        batch: &Batch,
        lora: &GpuAdapter,
        dpo: DpoPass<'_>,
    ) -> Result<()> {
        self.write_pairs(ws, batch)?;
        self.reference_logps(enc, ws, batch, dpo.reference)?;
        let t = self.forward_layers(enc, ws, batch, lora, false, None)?;
        self.head_loss(enc, ws, t)?;
        self.dpo_loss(enc, ws, batch, dpo.loss, 1.0)
    }

    /// Records the forward pass of `batch`'s pairs with `lora` and their completions'
    /// log-probabilities, (chosen, rejected) per pair, into `ws.dpo_reference`: how a reference
    /// is computed, in a step or ahead of training.
    pub fn pair_logps(&self, enc: &mut Encoder, ws: &Workspace, batch: &Batch, lora: &GpuAdapter) -> Result<()> {
        self.write_pairs(ws, batch)?;
        self.reference_logps(enc, ws, batch, Reference::Adapter(lora))
    }

    fn write_pairs(&self, ws: &Workspace, batch: &Batch) -> Result<()> {
        if batch.pairs.is_empty() {
            return Err(Error::invalid("DPO batch", "holds no preference pair"));
        }
        self.ctx.queue.write_buffer(&ws.dpo_spans, 0, bytemuck::cast_slice(&batch.pairs));
        Ok(())
    }

    fn reference_logps(&self, enc: &mut Encoder, ws: &Workspace, batch: &Batch, r: Reference<'_>) -> Result<()> {
        match r {
            Reference::Given(logps) => {
                if logps.len() != 2 * batch.pairs.len() {
                    return Err(Error::invalid(
                        "DPO reference",
                        format!("{} log-probabilities for {} pairs", logps.len(), batch.pairs.len()),
                    ));
                }
                self.ctx.queue.write_buffer(&ws.dpo_reference, 0, bytemuck::cast_slice(logps));
                Ok(())
            }
            Reference::Adapter(reference) => {
                let t = self.forward_layers(enc, ws, batch, reference, false, None)?;
                self.head_loss(enc, ws, t)?;
                let pairs = launch::DpoPairs { loss: &ws.loss, spans: &ws.dpo_spans, n_pairs: batch.pairs.len() };
                launch::dpo_logps(&self.ctx, enc, pairs, &ws.dpo_reference)
            }
        }
    }

    fn dpo_loss(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        batch: &Batch,
        loss: launch::DpoLoss,
        scale: f32,
    ) -> Result<()> {
        let pairs = launch::DpoPairs { loss: &ws.loss, spans: &ws.dpo_spans, n_pairs: batch.pairs.len() };
        let out = launch::DpoOut { reference: &ws.dpo_reference, weights: &ws.dpo_weights, stats: &ws.dpo_stats };
        launch::dpo_loss(&self.ctx, enc, pairs, loss, out, scale)
    }

    /// Every layer's backward, last to first, from the gradient the head left in `ws.d_res`.
    fn layers_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        t: usize,
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let ctx = &self.ctx;
        let th = t * self.config.hidden_size;
        for l in (0..self.config.num_layers).rev() {
            let x_in = if ws.half() {
                launch::f16_unpack(ctx, enc, &ws.x_in[l], &ws.x_cur, th)?;
                &ws.x_cur
            } else {
                &ws.x_in[l]
            };
            let acts = &ws.acts[if ws.checkpointing || ws.half() { 0 } else { l }];
            if ws.checkpointing {
                self.layer_forward(enc, ws, l, acts, None, x_in, &ws.x_tmp, lora, t, drop)?;
            } else if ws.half() {
                let saved = &ws.saved[l];
                let c = &self.config;
                for (((_, from), (_, to)), n) in
                    saved.tensors(c).into_iter().zip(acts.tensors(c)).zip(self.act_sizes(t, lora.layout.r))
                {
                    launch::f16_unpack(ctx, enc, from, to, n)?;
                }
                enc.copy_buffer_to_buffer(&saved.stats, 0, &acts.stats, 0, saved.stats.size());
                for (from, to) in saved.inv_rms.iter().zip(&acts.inv_rms) {
                    enc.copy_buffer_to_buffer(from, 0, to, 0, from.size());
                }
            }
            self.layer_backward(enc, ws, l, acts, x_in, lora, grads, t, drop)?;
        }
        Ok(())
    }

    /// The dropout of a training step, if the adapter has any.
    fn dropout<'w>(&self, ws: &'w Workspace, batch: &Batch, lora: &GpuAdapter) -> Result<Option<Dropout<'w>>> {
        let p = lora.config.dropout;
        if p <= 0.0 {
            return Ok(None);
        }
        if ws.lora_x.size() < (batch.len() * self.widest_input() * 4) as u64 {
            return Err(Error::invalid(
                "LoRA dropout",
                format!("dropout {p} needs a workspace planned with dropout (Model::workspace_with)"),
            ));
        }
        Ok(Some(Dropout { scratch: &ws.lora_x, p, seed: batch.seed }))
    }

    /// Records the forward pass of `batch` only (no gradients, no dropout): per-token losses
    /// land in `ws.loss`, as in [`Model::forward_backward`]. For evaluation.
    pub fn forward_loss(&self, enc: &mut Encoder, ws: &Workspace, batch: &Batch, lora: &GpuAdapter) -> Result<()> {
        let t = self.forward_layers(enc, ws, batch, lora, false, None)?;
        self.head_loss(enc, ws, t)
    }

    /// Checks the batch, writes its inputs and records the embedding and every layer's
    /// forward; `keep` keeps each layer's activations for the backward pass (without
    /// checkpointing). Returns the batch's token count.
    fn forward_layers(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        batch: &Batch,
        lora: &GpuAdapter,
        keep: bool,
        drop: Option<Dropout<'_>>,
    ) -> Result<usize> {
        let t = batch.len();
        let c = &self.config;
        if t == 0 {
            return Err(Error::invalid("batch", "is empty"));
        }
        if t > ws.capacity {
            return Err(Error::invalid("batch", format!("{t} tokens exceed the workspace's {}", ws.capacity)));
        }
        if lora.layout.r > 0 && ws.lora_h.size() < (3 * t * lora.layout.r * 4) as u64 {
            return Err(Error::invalid("LoRA rank", format!("{} exceeds the workspace's", lora.layout.r)));
        }
        if let Some(&bad) = batch.ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(Error::invalid("token id", format!("{bad} is outside the vocabulary of {}", c.vocab_size)));
        }
        if let Some(&p) = batch.positions.iter().max()
            && p as usize >= self.max_context
        {
            return Err(Error::invalid(
                "sample length",
                format!("a sample reaches position {p}, beyond the context of {}", self.max_context),
            ));
        }
        let q = &self.ctx.queue;
        q.write_buffer(&ws.ids, 0, bytemuck::cast_slice(&batch.ids));
        q.write_buffer(&ws.targets, 0, bytemuck::cast_slice(&batch.targets));
        q.write_buffer(&ws.positions, 0, bytemuck::cast_slice(&batch.positions));
        q.write_buffer(&ws.key_start, 0, bytemuck::cast_slice(&batch.key_start));
        if let Some(w) = c.sliding_window {
            let starts = crate::model::llama::window_starts(&batch.key_start, 0, w);
            q.write_buffer(&ws.window_start, 0, bytemuck::cast_slice(&starts));
        }

        let ctx = &self.ctx;
        let h = c.hidden_size;
        for (buf, start, rows) in &self.embed.chunks {
            launch::embedding_forward(
                ctx,
                enc,
                launch::Embedding {
                    ids: &ws.ids,
                    table: self.embed.rows(buf),
                    out: ws.stream(0),
                    n_tokens: t,
                    dim: h,
                    row_start: *start,
                    row_count: *rows,
                    scale: c.embedding_scale,
                },
            )?;
        }
        if ws.half() {
            launch::f16_pack(ctx, enc, ws.stream(0), &ws.x_in[0], t * h)?;
        }
        for l in 0..c.num_layers {
            let (acts, save) = ws.forward_acts(l, keep);
            self.layer_forward(enc, ws, l, acts, save, ws.stream(l), ws.stream(l + 1), lora, t, drop)?;
            if ws.half() && l + 1 < c.num_layers {
                launch::f16_pack(ctx, enc, ws.stream(l + 1), &ws.x_in[l + 1], t * h)?;
            }
        }
        Ok(t)
    }

    fn rope_shape<'a>(&self, ws: &'a Workspace, t: usize) -> RopeShape<'a> {
        let c = &self.config;
        RopeShape {
            n_tokens: t,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            rot_dim: c.rotary_dim,
            pos_offset: 0,
            positions: &ws.positions,
        }
    }

    /// Layer l's forward through [`Model::block_forward`], its activations in `a`; with `save`,
    /// each is also stored as f16 as soon as it is written.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        l: usize,
        a: &LayerActs,
        save: Option<&LayerActs>,
        x_in: &wgpu::Buffer,
        x_out: &wgpu::Buffer,
        lora: &GpuAdapter,
        t: usize,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let ctx = &self.ctx;
        let sizes = self.act_sizes(t, lora.layout.r);
        let b = BlockBuffers {
            x_in,
            x_mid: &a.x_mid,
            x_out,
            xn: &ws.xn,
            q: &a.q,
            k: &a.k,
            q_raw: &a.q_raw,
            k_raw: &a.k_raw,
            v: &a.v,
            att: &a.att,
            attn_out: &a.attn_out,
            mlp_out: &a.mlp_out,
            stats: &a.stats,
            gate: &a.gate,
            up: &a.up,
            act: &ws.act,
            lora_h: LoraH { qkv: &a.h_qkv, o: &a.h_o, gate_up: &a.h_gate_up, down: &a.h_down },
            inv_rms: Some(a.inv_rms.each_ref()),
            positions: &ws.positions,
            key_start: ws.key_start_of(&self.config, l),
            kv_cache: None,
            rows: None,
        };
        // The activations complete at `stage`, stored as f16 before anything reads or
        // overwrites them.
        let c = &self.config;
        let mut keep = |enc: &mut Encoder, stage: Stage| -> Result<()> {
            let Some(s) = save else { return Ok(()) };
            if stage == Stage::Attention {
                enc.copy_buffer_to_buffer(&a.stats, 0, &s.stats, 0, a.stats.size());
            }
            if stage == Stage::GateUp {
                for (from, to) in a.inv_rms.iter().zip(&s.inv_rms) {
                    enc.copy_buffer_to_buffer(from, 0, to, 0, from.size());
                }
            }
            for (((done, from), (_, to)), &n) in a.tensors(c).into_iter().zip(s.tensors(c)).zip(&sizes) {
                if done == stage {
                    launch::f16_pack(ctx, enc, from, to, n)?;
                }
            }
            Ok(())
        };
        self.block_forward(enc, l, &b, Some(lora), t, drop, &mut keep)
    }

    /// Final norm, lm_head and the fused cross-entropy in row chunks (so the logits never
    /// exceed one chunk), then the gradient back to the last layer's output in `ws.d_res`.
    /// Final norm, lm_head and the fused cross-entropy backward in row chunks, then the final
    /// norm's backward into `ws.d_res`; `weighted`: each row's gradient also times its DPO
    /// weight (`ws.dpo_weights`).
    fn head_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        t: usize,
        grad_scale: f32,
        weighted: bool,
    ) -> Result<()> {
        let c = &self.config;
        let ctx = &self.ctx;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let x_last = ws.stream(c.num_layers);
        launch::rms_norm_forward(
            ctx,
            enc,
            launch::RmsNorm { x: x_last, w: &self.final_norm, y: &ws.xn, n_rows: t, dim: h, eps: c.rms_norm_eps },
        )?;
        let table = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut start = 0;
        while start < t {
            let rows = ws.head_rows.min(t - start);
            self.head_logits(enc, ws, start, rows)?;
            let ce = ws.head_cross_entropy(rows, v, self.config.final_softcap);
            if weighted {
                launch::cross_entropy_backward_weighted(ctx, enc, ce, grad_scale, &ws.dpo_weights, start)?;
            } else {
                launch::cross_entropy_backward(ctx, enc, ce, grad_scale)?;
            }
            enc.copy_buffer_to_buffer(&ws.head_loss, 0, &ws.loss, (start * 4) as u64, (rows * 4) as u64);
            for (ci, (buf, first, n)) in table.chunks.iter().enumerate() {
                let dy = DyCols { buf: &ws.logits, stride: v, col_offset: *first };
                let out = if ci == 0 { OutCols::whole(h) } else { OutCols::whole(h).accumulated() };
                launch::matmul_backward(
                    ctx,
                    enc,
                    launch::MatmulGrad { dy, w: table.weight(buf), dx: &ws.head_dx, m: rows, n: *n, k: h, out },
                )?;
            }
            enc.copy_buffer_to_buffer(&ws.head_dx, 0, &ws.d_xn, (start * h * 4) as u64, (rows * h * 4) as u64);
            start += rows;
        }
        enc.clear_buffer(&ws.d_res, 0, None);
        launch::rms_norm_backward(
            ctx,
            enc,
            launch::RmsNormGrad {
                x: x_last,
                w: &self.final_norm,
                dy: &ws.d_xn,
                dx: &ws.d_res,
                n_rows: t,
                dim: h,
                eps: c.rms_norm_eps,
            },
        )
    }

    /// Final norm, lm_head and the cross-entropy (forward only) in row chunks; per-token losses
    /// into `ws.loss`.
    fn head_loss(&self, enc: &mut Encoder, ws: &Workspace, t: usize) -> Result<()> {
        let c = &self.config;
        let ctx = &self.ctx;
        let (h, v) = (c.hidden_size, c.vocab_size);
        launch::rms_norm_forward(
            ctx,
            enc,
            launch::RmsNorm {
                x: ws.stream(c.num_layers),
                w: &self.final_norm,
                y: &ws.xn,
                n_rows: t,
                dim: h,
                eps: c.rms_norm_eps,
            },
        )?;
        let mut start = 0;
        while start < t {
            let rows = ws.head_rows.min(t - start);
            self.head_logits(enc, ws, start, rows)?;
            launch::cross_entropy_forward(ctx, enc, ws.head_cross_entropy(rows, v, self.config.final_softcap))?;
            enc.copy_buffer_to_buffer(&ws.head_loss, 0, &ws.loss, (start * 4) as u64, (rows * 4) as u64);
            start += rows;
        }
        Ok(())
    }

    /// Logits of rows `start..start + rows` of `ws.xn` into `ws.logits`, and their targets into
    /// `ws.head_targets`.
    fn head_logits(&self, enc: &mut Encoder, ws: &Workspace, start: usize, rows: usize) -> Result<()> {
        let h = self.config.hidden_size;
        enc.copy_buffer_to_buffer(&ws.xn, (start * h * 4) as u64, &ws.head_x, 0, (rows * h * 4) as u64);
        enc.copy_buffer_to_buffer(&ws.targets, (start * 4) as u64, &ws.head_targets, 0, (rows * 4) as u64);
        self.record_logits(enc, &ws.head_x, &ws.logits, rows, None)
    }

    /// dx (+)= the sum of dy W over `group`'s (module, dy), modules that all read the normed
    /// rows x (q, k and v; gate and up), and their LoRA gradients (added to `grads`). Without
    /// dropout the adapter's x A^T of all of them is in `h`, where the forward pass put it as
    /// one product (`Model::lora_a_shared`); each module's dB and dh read and write its columns
    /// of that h and of the shared dh, dA reads x through the norm with its kept 1 / rms, and
    /// dx += dh A is one product over the gathered rows of the distinct A matrices (Phi-3's
    /// fused modules share one, whose dh sums theirs). With dropout (a mask per module), x is
    /// normed into `ws.xn` again and the modules go one by one, each x A^T recomputed.
    #[allow(clippy::too_many_arguments)]
    fn group_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        l: usize,
        group: &[(Module, &wgpu::Buffer)],
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        (normed, dx, h): (NormedRows<'_>, &wgpu::Buffer, &wgpu::Buffer),
        t: usize,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let modules: Vec<Module> = group.iter().map(|g| g.0).collect();
        let at = match (drop, self.lora_a_layout(l, &modules, lora)) {
            (None, Some(shared)) => shared.at,
            (_, layout) => {
                // The rows are read only where a module has an adapter.
                if layout.is_some() {
                    let (n_rows, dim, eps) = (t, self.config.hidden_size, self.config.rms_norm_eps);
                    let norm = launch::RmsNorm { x: normed.x, w: normed.w, y: &ws.xn, n_rows, dim, eps };
                    launch::rms_norm_forward(&self.ctx, enc, norm)?;
                }
                for (i, &(m, dy)) in group.iter().enumerate() {
                    let input = ModuleInput { x: &ws.xn, gated: None, h: None };
                    self.linear_backward(enc, ws, l, m, lora, grads, input, dy, dx, i > 0, t, drop)?;
                }
                return Ok(());
            }
        };
        let ctx = &self.ctx;
        let (r, scale, p) = (lora.layout.r, lora.scale, &lora.params);
        let n_in = self.layers[l].linear(group[0].0).n_in;
        // The distinct A matrices, by their first column in h: (column, A's offset).
        let mut firsts: Vec<(usize, usize)> = Vec::new();
        let mut stride = r;
        for (i, &(m, dy)) in group.iter().enumerate() {
            let lin = self.layers[l].linear(m);
            let (Some(s), Some((col, n))) = (lora.layout.slot(l, m), at[i]) else { continue };
            stride = n;
            // dB += scale * dy^T h (this module's columns of h).
            let db = launch::WeightGrad {
                dy,
                x: h,
                dw: grads,
                dw_offset: s.b,
                m: t,
                n: lin.n_out,
                k: r,
                alpha: scale,
                accumulate: true,
            };
            launch::matmul_backward_w_cols(
                ctx,
                enc,
                db,
                launch::WeightGradCols { x: Some((n, col)), ..Default::default() },
            )?;
            // dh (+)= scale * dy B into its columns of dh: summed where modules share an A.
            let shared = firsts.iter().any(|&(c, _)| c == col);
            let out = OutCols::at(n, col).scaled(scale);
            let out = if shared { out.accumulated() } else { out };
            let dh = launch::MatmulGrad {
                dy: DyCols::whole(dy, lin.n_out),
                w: Weight::DenseAt(p, s.b),
                dx: &ws.lora_dh,
                m: t,
                n: lin.n_out,
                k: r,
                out,
            };
            launch::matmul_backward(ctx, enc, dh)?;
            if !shared {
                firsts.push((col, s.a));
            }
        }
        // The distinct A matrices in the order of their columns of h and dh (firsts is already:
        // lora_a_shared numbers them in the order of the modules, as above).
        firsts.sort_by_key(|f| f.0);
        let a_of = |j: usize| firsts.get(j).map_or(firsts[0].1, |f| f.1);
        let blocks = launch::Gather { rows: r, offsets: [a_of(1), a_of(2)] };
        // dA += dh^T x for the distinct A matrices as one product over all of dh, x read once,
        // through the norm; each block of r rows of the result goes where its A lies.
        let through_norm = launch::RowInput::RmsNormKept { w: normed.w, inv_rms: normed.inv_rms };
        let da = launch::WeightGrad {
            dy: &ws.lora_dh,
            x: normed.x,
            dw: grads,
            dw_offset: a_of(0),
            m: t,
            n: firsts.len() * r,
            k: n_in,
            alpha: 1.0,
            accumulate: true,
        };
        let cols = launch::WeightGradCols {
            dy: Some((stride, 0)),
            x: None,
            x_input: Some(through_norm),
            dw_rows: Some(blocks),
        };
        launch::matmul_backward_w_cols(ctx, enc, da, cols)?;
        // dx = the modules' dy W, plus dh A over the distinct A matrices' rows, gathered in the
        // order of their columns, which the last module's product sums as more of its reduction
        // (two rows or more).
        let fused = t >= 2;
        for (i, &(m, dy)) in group.iter().enumerate() {
            let lin = self.layers[l].linear(m);
            let out = if i > 0 { OutCols::whole(n_in).accumulated() } else { OutCols::whole(n_in) };
            let base = launch::MatmulGrad {
                dy: DyCols::whole(dy, lin.n_out),
                w: lin.weight(),
                dx,
                m: t,
                n: lin.n_out,
                k: n_in,
                out,
            };
            if fused && i + 1 == group.len() {
                let dh_a = launch::LoraDx { dh: &ws.lora_dh, n: stride, params: p, first: a_of(0), gather: blocks };
                return launch::matmul_backward_lora(ctx, enc, base, dh_a);
            }
            launch::matmul_backward(ctx, enc, base)?;
        }
        let dxa = launch::MatmulGrad {
            dy: DyCols::whole(&ws.lora_dh, stride),
            w: Weight::DenseAt(p, a_of(0)),
            dx,
            m: t,
            n: stride,
            k: n_in,
            out: OutCols::whole(n_in).accumulated(),
        };
        launch::matmul_backward_gathered(ctx, enc, dxa, blocks)
    }

    /// dx (+)= dy W, and the LoRA gradients of this module (added to `grads`), for the input
    /// the forward pass gave the module (`input`).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        l: usize,
        module: Module,
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        input: ModuleInput<'_>,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        accumulate: bool,
        t: usize,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let ctx = &self.ctx;
        let lin = self.layers[l].linear(module);
        let (n_out, n_in) = (lin.n_out, lin.n_in);
        let out = if accumulate { OutCols::whole(n_in).accumulated() } else { OutCols::whole(n_in) };
        // dx (+)= dy W through the base weight: last, to sum dh A with it where it can.
        let base =
            launch::MatmulGrad { dy: DyCols::whole(dy, n_out), w: lin.weight(), dx, m: t, n: n_out, k: n_in, out };
        let Some(s) = lora.layout.slot(l, module) else { return launch::matmul_backward(ctx, enc, base) };
        let (r, scale, p) = (lora.layout.r, lora.scale, &lora.params);
        let ModuleInput { x, gated, h } = input;
        // With dropout the adapter saw the masked input: rebuild it (same mask).
        let x = match drop {
            Some(_) if gated.is_some() => {
                return Err(Error::invalid("LoRA dropout", "masks a written input, not one read through an op"));
            }
            Some(d) => d.apply(ctx, enc, x, t * n_in, l, s.group)?,
            None => x,
        };
        let h = match (h, drop) {
            (Some(h), None) => h,
            _ => {
                if gated.is_some() {
                    return Err(Error::invalid("linear backward", "an input read through an op needs its x A^T kept"));
                }
                let mm = launch::Matmul {
                    x,
                    w: Weight::DenseAt(p, s.a),
                    bias: None,
                    y: &ws.lora_h,
                    m: t,
                    n: r,
                    k: n_in,
                    out: OutCols::whole(r),
                };
                launch::matmul_forward(ctx, enc, mm)?;
                &ws.lora_h
            }
        };
        // dB += scale * dy^T h
        launch::matmul_backward_w(
            ctx,
            enc,
            launch::WeightGrad {
                dy,
                x: h,
                dw: grads,
                dw_offset: s.b,
                m: t,
                n: n_out,
                k: r,
                alpha: scale,
                accumulate: true,
            },
        )?;
        // dh = scale * dy B
        let out = OutCols::whole(r).scaled(scale);
        launch::matmul_backward(
            ctx,
            enc,
            launch::MatmulGrad {
                dy: DyCols::whole(dy, n_out),
                w: Weight::DenseAt(p, s.b),
                dx: &ws.lora_dh,
                m: t,
                n: n_out,
                k: r,
                out,
            },
        )?;
        // dA += dh^T x
        launch::matmul_backward_w_cols(
            ctx,
            enc,
            launch::WeightGrad {
                dy: &ws.lora_dh,
                x,
                dw: grads,
                dw_offset: s.a,
                m: t,
                n: r,
                k: n_in,
                alpha: 1.0,
                accumulate: true,
            },
            launch::WeightGradCols { x_input: gated, ..Default::default() },
        )?;
        // dx += dh A, through the dropout mask when there is one; otherwise the base product
        // sums it as more of its reduction (two rows or more).
        let dh = DyCols::whole(&ws.lora_dh, r);
        match drop {
            None if t >= 2 => {
                let gather = launch::Gather { rows: r, offsets: [s.a, s.a] };
                let dh_a = launch::LoraDx { dh: &ws.lora_dh, n: r, params: p, first: s.a, gather };
                launch::matmul_backward_lora(ctx, enc, base, dh_a)
            }
            None => {
                launch::matmul_backward(ctx, enc, base)?;
                let out = OutCols::whole(n_in).accumulated();
                launch::matmul_backward(
                    ctx,
                    enc,
                    launch::MatmulGrad { dy: dh, w: Weight::DenseAt(p, s.a), dx, m: t, n: r, k: n_in, out },
                )
            }
            Some(d) => {
                launch::matmul_backward(ctx, enc, base)?;
                let out = OutCols::whole(n_in);
                launch::matmul_backward(
                    ctx,
                    enc,
                    launch::MatmulGrad {
                        dy: dh,
                        w: Weight::DenseAt(p, s.a),
                        dx: &ws.lora_dx,
                        m: t,
                        n: r,
                        k: n_in,
                        out,
                    },
                )?;
                launch::dropout(ctx, enc, &ws.lora_dx, t * n_in, d.p, d.module_seed(l, s.group))?;
                launch::add_forward(ctx, enc, &ws.lora_dx, dx, t * n_in)
            }
        }
    }

    /// Backward through layer `l`: on entry ws.d_res holds dL/d(layer output); on exit,
    /// dL/d(layer input).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        enc: &mut Encoder,
        ws: &Workspace,
        l: usize,
        a: &LayerActs,
        x_in: &wgpu::Buffer,
        lora: &GpuAdapter,
        grads: &wgpu::Buffer,
        t: usize,
        drop: Option<Dropout<'_>>,
    ) -> Result<()> {
        let c = &self.config;
        let ctx = &self.ctx;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let layer = &self.layers[l];
        let eps = c.rms_norm_eps;
        // Through Gemma's norm after attention or the MLP (its weights frozen): the gradient of
        // the projection's output, in d_xn (free until the projections before it write it).
        let through_post_norm = |enc: &mut Encoder, norm: &Option<wgpu::Buffer>, out: &wgpu::Buffer| -> Result<()> {
            if let Some(w) = norm {
                enc.clear_buffer(&ws.d_xn, 0, Some((t * h * 4) as u64));
                let g = launch::RmsNormGrad { x: out, w, dy: &ws.d_res, dx: &ws.d_xn, n_rows: t, dim: h, eps };
                launch::rms_norm_backward(ctx, enc, g)?;
            }
            Ok(())
        };
        let post_grad = |norm: &Option<wgpu::Buffer>| if norm.is_some() { &ws.d_xn } else { &ws.d_res };
        // MLP. down_proj's input act(gate) * up: its dA reads it through the op (and its dB the
        // kept x A^T), but where dropout masks it, it is written again.
        let down_in = match drop {
            None => ModuleInput { x: &a.gate, gated: Some(self.gated(&a.up)), h: Some(&a.h_down) },
            Some(_) => {
                self.gate_forward(enc, &a.gate, &a.up, &ws.act, t * i)?;
                ModuleInput { x: &ws.act, gated: None, h: None }
            }
        };
        through_post_norm(enc, &layer.post_ffn_norm, &a.mlp_out)?;
        let d_down = post_grad(&layer.post_ffn_norm);
        self.linear_backward(enc, ws, l, Module::DownProj, lora, grads, down_in, d_down, &ws.d_act, false, t, drop)?;
        self.gate_backward(
            enc,
            launch::SiluMulGrad {
                gate: &a.gate,
                up: &a.up,
                dout: &ws.d_act,
                dgate: &ws.d_gate,
                dup: &ws.d_up,
                n: t * i,
            },
        )?;
        let group = [(Module::GateProj, &ws.d_gate), (Module::UpProj, &ws.d_up)];
        let normed = NormedRows { x: &a.x_mid, w: &layer.ffn_norm, inv_rms: &a.inv_rms[1] };
        self.group_backward(enc, ws, l, &group, lora, grads, (normed, &ws.d_xn, &a.h_gate_up), t, drop)?;
        launch::rms_norm_backward(
            ctx,
            enc,
            launch::RmsNormGrad {
                x: &a.x_mid,
                w: &layer.ffn_norm,
                dy: &ws.d_xn,
                dx: &ws.d_res,
                n_rows: t,
                dim: h,
                eps,
            },
        )?;
        // Attention.
        through_post_norm(enc, &layer.post_attn_norm, &a.attn_out)?;
        let d_o = post_grad(&layer.post_attn_norm);
        let o_in = ModuleInput { x: &a.att, gated: None, h: Some(&a.h_o) };
        self.linear_backward(enc, ws, l, Module::OProj, lora, grads, o_in, d_o, &ws.d_att, false, t, drop)?;
        let key_start = ws.key_start_of(c, l);
        let fwd = AttentionIo { q: &a.q, k: &a.k, v: &a.v, key_start, out: &a.att, stats: &a.stats };
        let b = AttentionGrads { fwd, dout: &ws.d_att, dq: &ws.dq, dk: &ws.dk, dv: &ws.dv };
        launch::attention_backward(ctx, enc, b, self.attention_shape(t, 0))?;
        launch::rope_backward(ctx, enc, [&ws.dq, &ws.dk], self.rope_table(l), self.rope_shape(ws, t))?;
        // Through Qwen3's per-head norms (their weights frozen), both in one dispatch: the
        // backward adds into its output, so each starts from zero.
        let (dq, dk) = match &layer.qk_norm {
            Some((q_norm, k_norm)) => {
                let hd = c.head_dim;
                let grad =
                    |x, w, dy, dx, heads: usize| launch::RmsNormGrad { x, w, dy, dx, n_rows: t * heads, dim: hd, eps };
                let q = grad(&a.q_raw, q_norm, &ws.dq, &ws.dq_raw, c.num_heads);
                let k = grad(&a.k_raw, k_norm, &ws.dk, &ws.dk_raw, c.num_kv_heads);
                for g in [&q, &k] {
                    enc.clear_buffer(g.dx, 0, Some((g.n_rows * hd * 4) as u64));
                }
                launch::rms_norm_pair_backward(ctx, enc, [q, k])?;
                (&ws.dq_raw, &ws.dk_raw)
            }
            None => (&ws.dq, &ws.dk),
        };
        let group = [(Module::QProj, dq), (Module::KProj, dk), (Module::VProj, &ws.dv)];
        let normed = NormedRows { x: x_in, w: &layer.attn_norm, inv_rms: &a.inv_rms[0] };
        self.group_backward(enc, ws, l, &group, lora, grads, (normed, &ws.d_xn, &a.h_qkv), t, drop)?;
        launch::rms_norm_backward(
            ctx,
            enc,
            launch::RmsNormGrad { x: x_in, w: &layer.attn_norm, dy: &ws.d_xn, dx: &ws.d_res, n_rows: t, dim: h, eps },
        )
    }
}
