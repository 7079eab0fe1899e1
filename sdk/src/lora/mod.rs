//! LoRA adapters: the configuration, where every A and B matrix lives in the one flat f32
//! buffer that AdamW and the gradient norm run over, PEFT's initialization, and (in [`peft`])
//! the PEFT adapter files.
//!
//! Invariant: the layout orders slots by layer, then by module in [`Module::ALL`] order, and
//! within a slot A (r, n_in) comes before B (n_out, r), both row-major as PEFT stores them.

pub mod gguf;
pub mod merge;
pub mod peft;

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Loads an adapter: a PEFT adapter folder, or a GGUF LoRA adapter file ([`gguf`]).
pub fn load(path: &Path, model: &ModelConfig) -> Result<Adapter> {
    if path.is_file() { gguf::load(path, model) } else { peft::load(path, model) }
}

/// A linear module of a Llama-family block, by its Hugging Face name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// Attention's query projection (`self_attn.q_proj`).
    QProj,
    /// Attention's key projection (`self_attn.k_proj`).
    KProj,
    /// Attention's value projection (`self_attn.v_proj`).
    VProj,
    /// Attention's output projection (`self_attn.o_proj`).
    OProj,
    /// The MLP's gate projection (`mlp.gate_proj`).
    GateProj,
    /// The MLP's up projection (`mlp.up_proj`).
    UpProj,
    /// The MLP's down projection (`mlp.down_proj`).
    DownProj,
    /// Phi-3's fused query, key and value projection (`self_attn.qkv_proj`): one adapter whose
    /// B holds q's rows, then k's, then v's.
    QkvProj,
    /// Phi-3's fused gate and up projection (`mlp.gate_up_proj`): gate's rows, then up's.
    GateUpProj,
}

impl Module {
    /// Every linear module of a layer, in the order of the flat parameter buffer.
    pub const ALL: [Module; 7] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];

    /// The module's name in Hugging Face checkpoints (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
            Module::QkvProj => "qkv_proj",
            Module::GateUpProj => "gate_up_proj",
        }
    }

    /// The parent in the checkpoint path (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Module::QProj | Module::KProj | Module::VProj | Module::OProj | Module::QkvProj => "self_attn",
            _ => "mlp",
        }
    }

    /// (n_out, n_in) of this module's weight.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (h, qd, kvd, i) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        match self {
            Module::QProj => (qd, h),
            Module::KProj | Module::VProj => (kvd, h),
            Module::OProj => (h, qd),
            Module::GateProj | Module::UpProj => (i, h),
            Module::DownProj => (h, i),
            Module::QkvProj => (qd + 2 * kvd, h),
            Module::GateUpProj => (2 * i, h),
        }
    }

    /// Its place in [`Module::ALL`] (the fused modules come after).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The linear modules that carry adapters in a model: Phi-3 fuses q, k and v, and gate
    /// and up, into one module each (as its checkpoints and PEFT do).
    pub fn adaptable(model: &ModelConfig) -> Vec<Module> {
        if model.fused_projections {
            vec![Module::QkvProj, Module::OProj, Module::GateUpProj, Module::DownProj]
        } else {
            Module::ALL.to_vec()
        }
    }

    /// The modules whose outputs a module's rows make, in order: itself, or the parts of a
    /// fused one.
    pub fn parts(self) -> &'static [Module] {
        match self {
            Module::QkvProj => &[Module::QProj, Module::KProj, Module::VProj],
            Module::GateUpProj => &[Module::GateProj, Module::UpProj],
            Module::QProj => &[Module::QProj],
            Module::KProj => &[Module::KProj],
            Module::VProj => &[Module::VProj],
            Module::OProj => &[Module::OProj],
            Module::GateProj => &[Module::GateProj],
            Module::UpProj => &[Module::UpProj],
            Module::DownProj => &[Module::DownProj],
        }
    }

    /// Every module, the fused ones included.
    pub const EVERY: [Module; 9] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
        Module::QkvProj,
        Module::GateUpProj,
    ];
}

/// Which linear modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`: every linear layer of every block (never lm_head), as PEFT means it.
    Preset(String),
    /// Module names (`q_proj`, `v_proj`, ...), matched as PEFT matches a list: by the last
    /// component of the module path.
    Names(Vec<String>),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Preset("all-linear".into())
    }
}

/// A LoRA configuration, in PEFT's terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator: the update is (alpha / r) * B A, or (alpha / sqrt(r)) * B A with rsLoRA.
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// The modules adapted: `"all-linear"` or a list of names, as PEFT takes them.
    pub target_modules: TargetModules,
    /// rsLoRA scaling (alpha / sqrt(r)).
    pub use_rslora: bool,
    /// Seed of A's initialization.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            seed: 0,
        }
    }
}

/// The largest LoRA rank accepted: far above the ranks used in practice (4 to 256), and a
/// bound on the adapter's size that no configuration value can push past.
pub const MAX_RANK: usize = 4096;

impl LoraConfig {
    /// The factor that multiplies B A.
    pub fn scale(&self) -> f32 {
        if self.use_rslora { self.alpha / (self.r as f32).sqrt() } else { self.alpha / self.r as f32 }
    }

    /// Every problem with this configuration, as one error.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.r == 0 {
            problems.push("r must be at least 1 (r = 0 would train nothing)".to_string());
        } else if self.r > MAX_RANK {
            problems.push(format!("r {} is more than {MAX_RANK}, the most edgetune accepts", self.r));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            problems.push(format!("alpha must be a positive number (got {})", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            problems.push(format!("dropout must be in [0, 1) (got {})", self.dropout));
        }
        match &self.target_modules {
            TargetModules::Preset(p) if p != "all-linear" => {
                problems.push(format!("target_modules `{p}`: expected \"all-linear\" or a list of module names"))
            }
            TargetModules::Names(n) if n.is_empty() => problems.push("target_modules is an empty list".to_string()),
            _ => {}
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::invalid("LoRA config", problems.join("; "))) }
    }

    /// The modules this configuration targets on `model` (see [`Module::adaptable`]); an error
    /// names the targets that match nothing.
    pub fn modules(&self, model: &ModelConfig) -> Result<Vec<Module>> {
        let adaptable = Module::adaptable(model);
        match &self.target_modules {
            TargetModules::Preset(_) => Ok(adaptable),
            TargetModules::Names(names) => {
                let mut out = Vec::new();
                let mut unknown = Vec::new();
                for n in names {
                    // PEFT matches a list entry against the end of the module path.
                    let last = n.rsplit('.').next().unwrap_or(n);
                    match adaptable.iter().find(|m| m.name() == last) {
                        Some(m) if !out.contains(m) => out.push(*m),
                        Some(_) => {}
                        None => unknown.push(n.clone()),
                    }
                }
                if !unknown.is_empty() {
                    return Err(Error::invalid(
                        "target_modules",
                        format!(
                            "{unknown:?} match no linear module of this model (it has {})",
                            adaptable.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                // One order whatever the list's: the model's (the flat buffer's layout).
                out.sort_by_key(|m| adaptable.iter().position(|a| a == m));
                Ok(out)
            }
        }
    }
}

/// One adapted linear layer and where its matrices sit in the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The decoder layer, from 0.
    pub layer: usize,
    /// The linear module within it (one part of a fused module, for a slot from
    /// [`Layout::slot`] of a part).
    pub module: Module,
    /// The module that carries the adapter: `module` itself, or the fused module it is part of
    /// (its A is shared by the parts, and its dropout mask).
    pub group: Module,
    /// The module's input features (A's columns).
    pub n_in: usize,
    /// The module's output features (B's rows).
    pub n_out: usize,
    /// Offset of A (r, n_in).
    pub a: usize,
    /// Offset of B (n_out, r).
    pub b: usize,
}

/// Where every LoRA matrix of a model lives in the flat parameter buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The rank: A is (r, n_in) and B (n_out, r) in every slot.
    pub r: usize,
    /// Every adapted module, in buffer order.
    pub slots: Vec<Slot>,
    /// `index[layer][module]` is the slot of that module (or of the fused module it is part of),
    /// the first of its rows in that slot's B and how many, if adapted.
    index: Vec<[Option<(usize, usize, usize)>; 9]>,
    /// Floats in the flat buffer.
    pub len: usize,
    /// Whether the model is a multimodal model's language model, whose decoder layers PEFT puts
    /// under `model.language_model.layers` (else `model.layers`).
    multimodal: bool,
}

impl Layout {
    /// The layout for `cfg`'s targets on a model.
    pub fn new(model: &ModelConfig, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let modules = cfg.modules(model)?;
        let mut slots = Vec::new();
        let mut index = vec![[None; 9]; model.num_layers];
        let mut off = 0;
        for (layer, row) in index.iter_mut().enumerate() {
            for &module in &modules {
                let (n_out, n_in) = module.shape(model);
                row[module.index()] = Some((slots.len(), 0, n_out));
                let mut first = 0;
                for &part in module.parts() {
                    let rows = part.shape(model).0;
                    row[part.index()] = Some((slots.len(), first, rows));
                    first += rows;
                }
                slots.push(Slot { layer, module, group: module, n_in, n_out, a: off, b: off + cfg.r * n_in });
                off += cfg.r * (n_in + n_out);
            }
        }
        Ok(Layout { r: cfg.r, slots, index, len: off, multimodal: model.multimodal })
    }

    /// The slot of a module, if it is adapted. For a part of a fused module (q of Phi-3's
    /// qkv_proj), its share: the fused module's A, and the part's rows of its B.
    pub fn slot(&self, layer: usize, module: Module) -> Option<Slot> {
        let (i, first, n_out) = self.index.get(layer).and_then(|row| row[module.index()])?;
        let s = self.slots[i];
        Some(Slot { module, n_out, b: s.b + first * self.r, ..s })
    }

    /// Whether the layout is of a multimodal model's language model (PEFT names its layers
    /// under `model.language_model`).
    pub fn multimodal(&self) -> bool {
        self.multimodal
    }

    /// The PEFT key of a slot's A or B matrix
    /// (`base_model.model.model.layers.3.mlp.up_proj.lora_B.weight`; a multimodal model's under
    /// `base_model.model.model.language_model.layers`).
    pub fn peft_key(&self, slot: &Slot, b: bool) -> String {
        format!(
            "base_model.model.{}.{}.{}.{}.lora_{}.weight",
            if self.multimodal { "model.language_model.layers" } else { "model.layers" },
            slot.layer,
            slot.module.parent(),
            slot.module.name(),
            if b { "B" } else { "A" }
        )
    }
}

/// PEFT's initialization: A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (torch's kaiming_uniform_ with
/// a = sqrt(5)), B = 0, so the adapted model starts equal to the base. Seeded and independent of
/// the GPU.
pub fn init_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut rng = crate::prim::Rng::new(seed);
    let mut p = vec![0f32; layout.len];
    for s in &layout.slots {
        let bound = 1.0 / (s.n_in as f32).sqrt();
        for v in &mut p[s.a..s.a + layout.r * s.n_in] {
            *v = (rng.next_f32() * 2.0 - 1.0) * bound;
        }
    }
    p
}

/// An adapter on the host: its configuration, layout and flat parameters.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Its configuration, in PEFT's terms.
    pub config: LoraConfig,
    /// Where each module's A and B sit in `params`.
    pub layout: Layout,
    /// Every A and B, flat, in layout order.
    pub params: Vec<f32>,
}

impl Adapter {
    /// A freshly initialized adapter (PEFT's initialization, seeded by `config.seed`).
    pub fn new(model: &ModelConfig, config: LoraConfig) -> Result<Self> {
        let layout = Layout::new(model, &config)?;
        let params = init_params(&layout, config.seed);
        Ok(Adapter { config, layout, params })
    }

    /// An adapter read from a file (`path`, for errors) that adapts the (layer, module) pairs in
    /// `present`: every layer must carry the same modules. `read(layout, slot, is_b)` gives A
    /// (r, n_in) or B (n_out, r) of a slot of the adapter's layout (which names its PEFT keys),
    /// row-major, with its shape checked by the caller.
    pub(crate) fn from_file(
        path: &Path,
        model: &ModelConfig,
        present: &BTreeSet<(usize, Module)>,
        hyper: LoraHyper,
        mut read: impl FnMut(&Layout, &Slot, bool) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        if let Some(&(l, m)) = present.iter().find(|&&(l, _)| l >= model.num_layers) {
            return Err(Error::format(
                path,
                format!("a `{}` adapter on layer {l}, but the model has {} layers", m.name(), model.num_layers),
            ));
        }
        let modules: BTreeSet<Module> = present.iter().map(|&(_, m)| m).collect();
        if modules.is_empty() {
            return Err(Error::format(path, "holds no LoRA tensors"));
        }
        for l in 0..model.num_layers {
            for &m in &modules {
                if !present.contains(&(l, m)) {
                    return Err(Error::unsupported(
                        path,
                        format!("adapters on only some layers: layer {l} has no `{}` adapter", m.name()),
                    ));
                }
            }
        }
        let config = LoraConfig {
            r: hyper.r,
            alpha: hyper.alpha,
            dropout: hyper.dropout,
            target_modules: TargetModules::Names(modules.iter().map(|m| m.name().to_string()).collect()),
            use_rslora: hyper.use_rslora,
            seed: 0,
        };
        let layout = Layout::new(model, &config).map_err(|e| Error::format(path, e.to_string()))?;
        // Memory grows with what the file holds, never with what its config claims: a rank that
        // the tensors do not bear out is an error before the whole layout is allocated. The
        // layout places each slot's A then B one after another, so the tensors append in order.
        let mut params = Vec::new();
        for s in &layout.slots {
            for (b, off, n) in [(false, s.a, hyper.r * s.n_in), (true, s.b, s.n_out * hyper.r)] {
                let v = read(&layout, s, b)?;
                if v.len() != n {
                    return Err(Error::format(
                        path,
                        format!("layer {} `{}`: {} values, expected {n}", s.layer, s.module.name(), v.len()),
                    ));
                }
                debug_assert_eq!(off, params.len(), "the layout is contiguous");
                params.extend_from_slice(&v);
            }
        }
        if params.len() != layout.len {
            return Err(Error::format(path, format!("{} values, the layout needs {}", params.len(), layout.len)));
        }
        Ok(Adapter { config, layout, params })
    }
}

/// The scalar settings an adapter file states.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraHyper {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
}

/// An adapter resident on the GPU: the flat parameter buffer, its layout and scale.
#[derive(Debug)]
pub struct GpuAdapter {
    /// (layout's length) f32: every A and B, in layout order.
    pub params: wgpu::Buffer,
    /// Where each module's A and B sit in `params`.
    pub layout: Layout,
    /// Its configuration.
    pub config: LoraConfig,
    /// The factor of B A in the forward pass: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scale: f32,
}

impl GpuAdapter {
    /// Uploads `adapter`'s parameters.
    pub fn upload(ctx: &crate::gpu::GpuContext, adapter: &Adapter) -> Self {
        GpuAdapter {
            params: ctx.storage_from("lora params", &adapter.params),
            layout: adapter.layout.clone(),
            config: adapter.config.clone(),
            scale: adapter.config.scale(),
        }
    }

    /// Reads the parameters back into a host adapter.
    pub fn download(&self, ctx: &crate::gpu::GpuContext) -> Result<Adapter> {
        Ok(Adapter {
            config: self.config.clone(),
            layout: self.layout.clone(),
            params: ctx.read_f32(&self.params, self.layout.len)?,
        })
    }
}

/// Several adapters of one base resident at once, for decoding a batch whose sequences each
/// have their own (gathered LoRA, as S-LoRA and Punica do: see
/// [`crate::model::llama::Model::decode_rows`]): each decoder layer's A and B matrices of every
/// member copied one after another into that layer's buffer, so a kernel reads any row's
/// through a table of where each lies, and no binding holds more than a layer's.
#[derive(Debug)]
pub struct GpuAdapterSet {
    /// Layer l's matrices of every member, in the order given.
    pub layers: Vec<wgpu::Buffer>,
    /// Each member's layout, factor of B A, and for each layer where its matrices start in
    /// that layer's buffer less where they start in its own buffer.
    members: Vec<(Layout, f32, Vec<isize>)>,
    /// Unique to this set among the process's sets, so that a table made for it is never
    /// taken for another's.
    id: u64,
}

impl GpuAdapterSet {
    /// Copies `adapters` (none is allowed: every row then runs the base) into one buffer a
    /// decoder layer of `n_layers`; their own buffers stay as they are. Refused where a layer's
    /// matrices of them all do not fit one binding (`max_storage_buffer_binding_size`), or an
    /// adapter adapts a layer past `n_layers`.
    pub fn new(ctx: &crate::gpu::GpuContext, adapters: &[&GpuAdapter], n_layers: usize) -> Result<Self> {
        // Each member's matrices of each layer: one range of its buffer (slots go by layer).
        let mut ranges = vec![vec![None::<(usize, usize)>; n_layers]; adapters.len()];
        for (i, a) in adapters.iter().enumerate() {
            for s in &a.layout.slots {
                let end = s.b + s.n_out * a.layout.r;
                let range = ranges[i].get_mut(s.layer).ok_or_else(|| {
                    Error::invalid("adapter", format!("adapter {i} adapts layer {}, of a model of {n_layers}", s.layer))
                })?;
                *range = Some(range.map_or((s.a, end), |(from, to)| (from.min(s.a), to.max(end))));
            }
        }
        let limit = ctx.limits.max_storage_buffer_binding_size;
        let mut layers = Vec::with_capacity(n_layers);
        let mut members: Vec<(Layout, f32, Vec<isize>)> =
            adapters.iter().map(|a| (a.layout.clone(), a.scale, vec![0; n_layers])).collect();
        let mut enc = ctx.encoder();
        for l in 0..n_layers {
            let floats: usize = ranges.iter().filter_map(|r| r[l]).map(|(from, to)| to - from).sum();
            if (floats * 4) as u64 > limit {
                return Err(Error::invalid(
                    "adapters",
                    format!(
                        "{} adapters hold {} bytes in layer {l}, more than the {limit} this GPU binds at once \
                         (max_storage_buffer_binding_size): decode fewer adapters at a time",
                        adapters.len(),
                        floats * 4
                    ),
                ));
            }
            let what = format!("layer {l} of {} resident adapters", adapters.len());
            let buffer =
                ctx.allocating(&what, (floats.max(1) * 4) as u64, "decode fewer adapters at a time", || {
                    Ok(ctx.storage_zeroed("resident adapters", floats.max(1)))
                })?;
            let mut at = 0;
            for (i, a) in adapters.iter().enumerate() {
                if let Some((from, to)) = ranges[i][l] {
                    let bytes = ((to - from) * 4) as u64;
                    enc.copy_buffer_to_buffer(&a.params, (from * 4) as u64, &buffer, (at * 4) as u64, bytes);
                    members[i].2[l] = at as isize - from as isize;
                    at += to - from;
                }
            }
            layers.push(buffer);
        }
        ctx.submit([enc.finish()]);
        static SETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(GpuAdapterSet { layers, members, id })
    }

    /// This set's identity: no other set made in this process has it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many adapters it holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The largest rank among them (1 when it holds none).
    pub fn max_rank(&self) -> usize {
        self.members.iter().map(|m| m.0.r).max().unwrap_or(1).max(1)
    }

    /// Each member's layout.
    pub fn layouts(&self) -> impl Iterator<Item = &Layout> {
        self.members.iter().map(|m| &m.0)
    }

    /// The table that `lora_rows.wgsl` reads for a batch whose row t runs adapter `rows[t]`
    /// (`None`: the base): for each layer, each module of [`Module::ALL`] and each row, the
    /// words (A's first float, B's first float in the layer's buffer, rank, scale bits), rank 0
    /// where the row's adapter leaves the module out. Module m of layer l starts at entry
    /// `(l * 7 + m.index()) * rows.len()`.
    pub fn table(&self, rows: &[Option<usize>]) -> Result<Vec<u32>> {
        let n_layers = self.layers.len();
        if let Some(bad) = rows.iter().flatten().find(|&&i| i >= self.members.len()) {
            return Err(Error::invalid("adapter", format!("index {bad}, of {} resident adapters", self.members.len())));
        }
        let word = |v: usize| u32::try_from(v).map_err(|_| Error::invalid("adapters", "past the GPU's 32-bit indices"));
        let mut out = Vec::with_capacity(n_layers * Module::ALL.len() * rows.len() * 4);
        for l in 0..n_layers {
            for m in Module::ALL {
                for row in rows {
                    let slot = row.and_then(|i| {
                        let (layout, scale, shift) = &self.members[i];
                        layout.slot(l, m).map(|s| (s, layout.r, shift[l], *scale))
                    });
                    match slot {
                        Some((s, r, shift, scale)) => {
                            let at = |v: usize| word(v.wrapping_add_signed(shift));
                            out.extend([at(s.a)?, at(s.b)?, word(r)?, scale.to_bits()])
                        }
                        None => out.extend([0, 0, 0, 0]),
                    }
                }
            }
        }
        Ok(out)
    }
}
