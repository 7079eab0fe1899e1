//! edgetune's WGSL compute shaders (the `.wgsl` files of this package) and their registry:
//! every kernel's source embedded at build time, the preprocessor
//! (`#include`, `#for` unrolling, a variant's `const` overrides), the bind-group layout read
//! from each shader's declarations, and one `#[repr(C)]` params struct per shader (with a
//! compile-time size check against the WGSL struct).

use bytemuck::{Pod, Zeroable};

/// What went wrong in expanding a shader or reading its declarations; it names the shader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShaderError(pub String);

impl std::fmt::Display for ShaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShaderError {}

pub type Result<T> = std::result::Result<T, ShaderError>;

/// A WGSL shader known to edgetune: a source file and, for a variant, the module constants it
/// overrides. The name says what a variant changes (`matmul_nf4.m1`) and keys the pipeline cache.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    /// `const NAME: u32 = VALUE;` lines to replace, as (NAME, VALUE), and snippets to include in
    /// place of others, as ("common/x.wgsl", "common/y.wgsl").
    pub defines: &'static [(&'static str, &'static str)],
}

impl Shader {
    /// Whether the shader needs the adapter's subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.code_contains("subgroup")
    }

    /// Whether the shader needs cooperative matrices (wgpu's experimental feature), which only
    /// the cooperative-matrix families (coop16, coop8) use.
    pub fn uses_cooperative_matrix(&self) -> bool {
        self.code_contains("wgpu_cooperative_matrix")
    }

    /// Whether `word` occurs in the expanded source outside comments.
    fn code_contains(&self, word: &str) -> bool {
        expand(self).map(|s| s.lines().any(|l| l.split("//").next().is_some_and(|c| c.contains(word)))).unwrap_or(false)
    }

    /// The shader's bindings as its expanded source declares them, in order: binding 0 the
    /// params (`var<uniform>`), then storage buffers. Every kernel here uses group 0 only and
    /// numbers its bindings 0, 1, 2, ... without gaps; anything else is an error.
    pub fn bindings(&self) -> Result<Vec<Binding>> {
        self.bindings_in(&expand(self)?)
    }

    /// [`Shader::bindings`] read from this shader's already expanded source.
    pub fn bindings_in(&self, source: &str) -> Result<Vec<Binding>> {
        let bad = |what: String| ShaderError(format!("shader {}: {what}", self.name));
        let mut out = Vec::new();
        for line in source.lines().map(str::trim).filter(|l| !l.starts_with("//") && l.contains("@binding(")) {
            // A number, or the name of a module `const` (a snippet shared by kernels whose
            // bindings before it differ in number).
            let number = |attr: &str| -> Result<u32> {
                let rest = line.split(attr).nth(1).ok_or_else(|| bad(format!("no {attr} in {line:?}")))?;
                let n = rest.split(')').next().unwrap_or("").trim();
                n.parse()
                    .ok()
                    .or_else(|| const_u32(source, n))
                    .ok_or_else(|| bad(format!("bad {attr} in {line:?}: a number or a `const {n}: u32` is expected")))
            };
            if number("@group(")? != 0 {
                return Err(bad(format!("only group 0 is supported: {line:?}")));
            }
            if number("@binding(")? as usize != out.len() {
                return Err(bad(format!("bindings must be numbered 0, 1, 2, ... in order: {line:?}")));
            }
            let space = line.split("var<").nth(1).and_then(|r| r.split('>').next()).unwrap_or("");
            let words: Vec<&str> = space.split(',').map(str::trim).collect();
            let binding = match words.as_slice() {
                ["uniform"] => Binding::Uniform,
                ["storage"] | ["storage", "read"] => Binding::Storage { read_only: true },
                ["storage", "read_write"] => Binding::Storage { read_only: false },
                _ => return Err(bad(format!("unsupported binding {line:?}"))),
            };
            if (out.is_empty()) != (binding == Binding::Uniform) {
                return Err(bad(format!("binding 0, and only binding 0, holds the params: {line:?}")));
            }
            out.push(binding);
        }
        if out.is_empty() {
            return Err(bad("declares no bindings".into()));
        }
        Ok(out)
    }
}

/// A pipeline constant that a shader declares (`override NAME: T;`, or `override NAME: T = V;`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override<'a> {
    pub name: &'a str,
    /// It has a default (`= V`), so a pipeline may leave it out (`ROWS_LORA`,
    /// `common/lora_table.wgsl`); without one, every pipeline must be given it (the quantized
    /// kernels' `BLOCK_SIZE`, `common/block_size.wgsl`).
    pub optional: bool,
}

/// The pipeline constants that `source`, a shader's expanded source, declares, in order.
pub fn overrides_in(source: &str) -> Vec<Override<'_>> {
    source
        .lines()
        .filter_map(|l| l.split("//").next()?.trim().strip_prefix("override "))
        .filter_map(|rest| Some(Override { name: rest.split(':').next()?.trim(), optional: rest.contains('=') }))
        .collect()
}

/// The value of `const NAME: u32 = Vu;` in `source`, if it declares one.
fn const_u32(source: &str, name: &str) -> Option<u32> {
    let prefix = format!("const {name}: u32 = ");
    source
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix)?.split(';').next()?.trim().trim_end_matches('u').parse().ok())
}

/// What one binding of a kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The params, bound at a dynamic offset in the uniform ring.
    Uniform,
    Storage {
        read_only: bool,
    },
}

/// Declares every shader as a `pub const` and lists them all in [`ALL_SHADERS`], so a shader
/// cannot be added without the tests that compile every one seeing it.
macro_rules! shaders {
    ($($id:ident = $file:literal $(as $name:literal [$(($k:literal, $v:literal)),*])?;)*) => {
        $(pub const $id: Shader = Shader {
            name: shaders!(@name $file $(, $name)?),
            source: include_str!(concat!("../", $file, ".wgsl")),
            defines: &[$($(($k, $v)),*)?],
        };)*
        /// Every shader, so tests can compile each one on the adapter.
        pub const ALL_SHADERS: &[Shader] = &[$($id),*];
    };
    (@name $file:literal) => { $file };
    (@name $file:literal, $name:literal) => { $name };
}

shaders! {
    EMBEDDING = "embedding";
    EMBEDDING_F16 = "embedding_f16";
    RMS_NORM = "rms_norm";
    RMS_NORM_PAIR = "rms_norm" as "rms_norm.pair" [("common/rms_norm_one.wgsl", "common/rms_norm_pair.wgsl")];
    RMS_NORM_KEEP = "rms_norm" as "rms_norm.keep" [("common/rms_norm_inv.wgsl", "common/rms_norm_inv_kept.wgsl")];
    ROPE = "rope";
    SILU_MUL = "silu_mul";
    GELU_MUL = "gelu_mul";
    ADD = "add";
    DROPOUT = "dropout";
    LOGIT_SOFTCAP = "logit_softcap";
    F16_PACK = "f16_pack";
    F16_UNPACK = "f16_unpack";
    CROSS_ENTROPY = "cross_entropy";
    MATMUL = "matmul";
    MATMUL_NF4 = "matmul_nf4";
    MATMUL_F16 = "matmul_f16";
    // One-row variants for decoding: the 4-row kernels would spend 3/4 of their multiply-adds on
    // padding when M = 1.
    MATVEC = "matvec";
    MATVEC_NF4 = "matvec_nf4";
    MATVEC_F16 = "matvec_f16";
    // The same with their reduction in subgroup operations, for the GPU families on adapters
    // that have them (shaders/common/matvec_reduce_subgroup.wgsl).
    MATVEC_SUBGROUP = "matvec" as "matvec.subgroup" [("common/matvec_reduce.wgsl", "common/matvec_reduce_subgroup.wgsl")];
    MATVEC_NF4_SUBGROUP = "matvec_nf4" as "matvec_nf4.subgroup"
        [("common/matvec_reduce.wgsl", "common/matvec_reduce_subgroup.wgsl")];
    MATVEC_F16_SUBGROUP = "matvec_f16" as "matvec_f16.subgroup"
        [("common/matvec_reduce.wgsl", "common/matvec_reduce_subgroup.wgsl")];
    MATVEC_Q4_0_SUBGROUP = "matvec_nf4" as "matvec_nf4.q4_0.subgroup"
        [("common/matvec_reduce.wgsl", "common/matvec_reduce_subgroup.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATVEC_Q4_1_SUBGROUP = "matvec_nf4" as "matvec_nf4.q4_1.subgroup"
        [("common/matvec_reduce.wgsl", "common/matvec_reduce_subgroup.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    ATTENTION = "attention";
    // Split-key decoding: each workgroup of attention.wgsl takes one slice of the keys, and this
    // adds the slices' partial softmaxes.
    ATTENTION_COMBINE = "attention_combine";
    // A pass's keys and values into the KV cache, inside the compute pass (a copy would end it).
    KV_WRITE = "kv_write";
    ATTENTION_BACKWARD_KV_REDUCE = "attention_backward_kv_reduce";
    ADAMW = "adamw";
    GRAD_NORM = "grad_norm";
    CROSS_ENTROPY_BACKWARD = "cross_entropy_backward";
    CROSS_ENTROPY_BACKWARD_WEIGHTED = "cross_entropy_backward" as "cross_entropy_backward.weighted"
        [("common/ce_unweighted.wgsl", "common/ce_weighted.wgsl")];
    DPO = "dpo";
    DPO_LOGPS = "dpo_logps";
    MATMUL_BACKWARD = "matmul_backward";
    MATMUL_NF4_BACKWARD = "matmul_nf4_backward";
    MATMUL_F16_BACKWARD = "matmul_f16_backward";
    MATMUL_BACKWARD_W = "matmul_backward_w";
    RMS_NORM_BACKWARD = "rms_norm_backward";
    RMS_NORM_BACKWARD_PAIR = "rms_norm_backward" as "rms_norm_backward.pair"
        [("common/rms_norm_grad_one.wgsl", "common/rms_norm_grad_pair.wgsl")];
    ROPE_BACKWARD = "rope" as "rope_backward" [("INVERSE", "1")];
    SILU_MUL_BACKWARD = "silu_mul_backward";
    GELU_MUL_BACKWARD = "gelu_mul_backward";
    ATTENTION_BACKWARD_Q = "attention_backward_q";
    ATTENTION_BACKWARD_KV = "attention_backward_kv";
    MATMUL_SPLIT_REDUCE = "matmul_split_reduce";
    ARGMAX = "argmax";
    TOP_K = "top_k";
    // Gathered LoRA: each row of a batch with its own adapter (decoding many users at once).
    LORA_ROWS_A = "lora_rows" as "lora_rows.a" [];
    LORA_ROWS_B = "lora_rows" as "lora_rows.b" [("B_PRODUCT", "1")];
    ADAMW_COMMIT = "adamw_commit";
    FINITE_CHECK = "finite_check";
    // Register-tiled variants for CPU rasterizers (shaders/common/simd8.wgsl).
    MATMUL_SIMD8 = "matmul_simd8";
    MATMUL_F16_SIMD8 = "matmul_f16_simd8";
    MATMUL_NF4_SIMD8 = "matmul_nf4_simd8";
    MATVEC_SIMD8 = "matmul_simd8" as "matmul_simd8.one_row"
        [("common/simd8_forward.wgsl", "common/simd8_one_row.wgsl")];
    MATVEC_F16_SIMD8 = "matmul_f16_simd8" as "matmul_f16_simd8.one_row"
        [("common/simd8_forward.wgsl", "common/simd8_one_row.wgsl")];
    MATVEC_NF4_SIMD8 = "matmul_nf4_simd8" as "matmul_nf4_simd8.one_row"
        [("common/simd8_forward.wgsl", "common/simd8_one_row.wgsl")];
    MATMUL_BACKWARD_SIMD8 = "matmul_backward_simd8";
    MATMUL_F16_BACKWARD_SIMD8 = "matmul_f16_backward_simd8";
    MATMUL_NF4_BACKWARD_SIMD8 = "matmul_nf4_backward_simd8";
    MATMUL_BACKWARD_W_SIMD8 = "matmul_backward_w_simd8";
    MATMUL_BACKWARD_W_SIMD8_GATED = "matmul_backward_w_simd8" as "matmul_backward_w_simd8.gated" [("X_GATED", "1")];
    MATMUL_BACKWARD_W_SIMD8_NORMED = "matmul_backward_w_simd8" as "matmul_backward_w_simd8.normed" [("X_NORMED", "1")];
    ATTENTION_SIMD8 = "attention_simd8";
    ATTENTION_SIMD8_HD64 = "attention_simd8" as "attention_simd8.hd64" [("HD4", "16")];
    ATTENTION_SIMD8_HD256 = "attention_simd8" as "attention_simd8.hd256" [("HD4", "64")];
    ATTENTION_BACKWARD_Q_SIMD8 = "attention_backward_q_simd8";
    ATTENTION_BACKWARD_Q_SIMD8_HD64 = "attention_backward_q_simd8" as "attention_backward_q_simd8.hd64" [("HD4", "16")];
    ATTENTION_BACKWARD_Q_SIMD8_HD256 = "attention_backward_q_simd8" as "attention_backward_q_simd8.hd256" [("HD4", "64")];
    ATTENTION_BACKWARD_KV_SIMD8 = "attention_backward_kv_simd8";
    ATTENTION_BACKWARD_KV_SIMD8_HD64 = "attention_backward_kv_simd8" as "attention_backward_kv_simd8.hd64" [("HD4", "16")];
    ATTENTION_BACKWARD_KV_SIMD8_HD256 = "attention_backward_kv_simd8" as "attention_backward_kv_simd8.hd256" [("HD4", "64")];
    // The tile128 family for GPUs (shaders/common/tile128.wgsl).
    MATMUL_T128 = "matmul_t128";
    MATMUL_F16_T128 = "matmul_f16_t128";
    MATMUL_NF4_T128 = "matmul_nf4_t128";
    MATMUL_BACKWARD_T128 = "matmul_backward_t128";
    MATMUL_F16_BACKWARD_T128 = "matmul_f16_backward_t128";
    MATMUL_NF4_BACKWARD_T128 = "matmul_nf4_backward_t128";
    MATMUL_BACKWARD_W_T128 = "matmul_backward_w_t128";
    // Its kernels on 64 x 64 blocks (shaders/common/tile64.wgsl), for products with small grids.
    MATMUL_T64 = "matmul_t128" as "matmul_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_F16_T64 = "matmul_f16_t128" as "matmul_f16_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_NF4_T64 = "matmul_nf4_t128" as "matmul_nf4_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_Q4_0_T64 = "matmul_nf4_t128" as "matmul_nf4_t128.tile64.q4_0" [("common/tile128.wgsl", "common/tile64.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_1_T64 = "matmul_nf4_t128" as "matmul_nf4_t128.tile64.q4_1"
        [("common/tile128.wgsl", "common/tile64.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_BACKWARD_T64 = "matmul_backward_t128" as "matmul_backward_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_F16_BACKWARD_T64 = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_NF4_BACKWARD_T64 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    MATMUL_Q4_0_BACKWARD_T64 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.tile64.q4_0"
        [("common/tile128.wgsl", "common/tile64.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_1_BACKWARD_T64 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.tile64.q4_1"
        [("common/tile128.wgsl", "common/tile64.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_BACKWARD_W_T64 = "matmul_backward_w_t128" as "matmul_backward_w_t128.tile64" [("common/tile128.wgsl", "common/tile64.wgsl")];
    // Its dense kernels on blocks of 256 x 16 and 16 x 256 (shaders/common/tile_narrow.wgsl), for
    // the narrow products of LoRA: x A^T, dh = dy B, dB and dA.
    MATMUL_NARROW = "matmul_t128" as "matmul_t128.narrow" [("common/tile128.wgsl", "common/tile_narrow.wgsl")];
    MATMUL_NARROW_ROWS = "matmul_t128" as "matmul_t128.narrow_rows"
        [("common/tile128.wgsl", "common/tile_narrow.wgsl"), ("BR", "16u"), ("BC", "256u")];
    MATMUL_BACKWARD_NARROW = "matmul_backward_t128" as "matmul_backward_t128.narrow" [("common/tile128.wgsl", "common/tile_narrow.wgsl")];
    MATMUL_BACKWARD_NARROW_ROWS = "matmul_backward_t128" as "matmul_backward_t128.narrow_rows"
        [("common/tile128.wgsl", "common/tile_narrow.wgsl"), ("BR", "16u"), ("BC", "256u")];
    MATMUL_BACKWARD_W_NARROW = "matmul_backward_w_t128" as "matmul_backward_w_t128.narrow" [("common/tile128.wgsl", "common/tile_narrow.wgsl")];
    MATMUL_BACKWARD_W_NARROW_ROWS = "matmul_backward_w_t128" as "matmul_backward_w_t128.narrow_rows"
        [("common/tile128.wgsl", "common/tile_narrow.wgsl"), ("BR", "16u"), ("BC", "256u")];
    // The tiled families' attention, with its rows reduced by subgroup shuffles and (.shared)
    // in workgroup memory alone, for devices without subgroup operations.
    ATTENTION_T128 = "attention_t128";
    ATTENTION_T128_SHARED = "attention_t128" as "attention_t128.shared"
        [("common/attention_rows.wgsl", "common/attention_rows_shared.wgsl")];
    ATTENTION_BACKWARD_Q_T128 = "attention_backward_q_t128";
    ATTENTION_BACKWARD_Q_T128_SHARED = "attention_backward_q_t128" as "attention_backward_q_t128.shared"
        [("common/attention_rows.wgsl", "common/attention_rows_shared.wgsl")];
    ATTENTION_BACKWARD_KV_T128 = "attention_backward_kv_t128";
    ATTENTION_BACKWARD_KV_T128_SHARED = "attention_backward_kv_t128" as "attention_backward_kv_t128.shared"
        [("common/attention_rows.wgsl", "common/attention_rows_shared.wgsl")];
    // The coop16 family: the tile128 forward kernels, and the input gradients through frozen
    // f16 and NF4 weights, on the cooperative-matrix core (shaders/common/coop16.wgsl).
    MATMUL_COOP16 = "matmul_t128" as "matmul_t128.coop16" [("common/tile128.wgsl", "common/coop16.wgsl")];
    MATMUL_F16_COOP16 = "matmul_f16_t128" as "matmul_f16_t128.coop16" [("common/tile128.wgsl", "common/coop16.wgsl")];
    MATMUL_NF4_COOP16 = "matmul_nf4_t128" as "matmul_nf4_t128.coop16" [("common/tile128.wgsl", "common/coop16.wgsl")];
    MATMUL_F16_BACKWARD_COOP16 = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.coop16"
        [("common/tile128.wgsl", "common/coop16.wgsl")];
    MATMUL_NF4_BACKWARD_COOP16 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16"
        [("common/tile128.wgsl", "common/coop16.wgsl")];
    // The same five with the matrix operations written out in plain WGSL
    // (shaders/common/coop_mma_emulated.wgsl): how the coop16 kernels run on adapters without
    // matrix units when `GpuOptions::emulate_coop16` asks (tests on lavapipe).
    MATMUL_COOP16_EMULATED = "matmul_t128" as "matmul_t128.coop16.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl")];
    MATMUL_F16_COOP16_EMULATED = "matmul_f16_t128" as "matmul_f16_t128.coop16.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl")];
    MATMUL_NF4_COOP16_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop16.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl")];
    MATMUL_F16_BACKWARD_COOP16_EMULATED = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.coop16.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl")];
    MATMUL_NF4_BACKWARD_COOP16_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl")];
    // The coop8 family: every tile128 matmul kernel (forward, input and weight gradients) on the
    // cooperative-matrix core of 8 x 8 x 8 f32 fragments (shaders/common/coop8.wgsl), then the same
    // eleven with its matrix operations written out in plain WGSL
    // (shaders/common/coop8_mma_emulated.wgsl), for adapters without matrix units when
    // `GpuOptions::emulate_coop` asks (tests on lavapipe).
    MATMUL_COOP8 = "matmul_t128" as "matmul_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_F16_COOP8 = "matmul_f16_t128" as "matmul_f16_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_NF4_COOP8 = "matmul_nf4_t128" as "matmul_nf4_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_BACKWARD_COOP8 = "matmul_backward_t128" as "matmul_backward_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_F16_BACKWARD_COOP8 = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_NF4_BACKWARD_COOP8 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_BACKWARD_W_COOP8 = "matmul_backward_w_t128" as "matmul_backward_w_t128.coop8"
        [("common/tile128.wgsl", "common/coop8.wgsl")];
    MATMUL_Q4_0_COOP8 = "matmul_nf4_t128" as "matmul_nf4_t128.coop8.q4_0"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_COOP8 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8.q4_0"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_1_COOP8 = "matmul_nf4_t128" as "matmul_nf4_t128.coop8.q4_1"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_COOP8 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8.q4_1"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_COOP8_EMULATED = "matmul_t128" as "matmul_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_F16_COOP8_EMULATED = "matmul_f16_t128" as "matmul_f16_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_NF4_COOP8_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_BACKWARD_COOP8_EMULATED = "matmul_backward_t128" as "matmul_backward_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_F16_BACKWARD_COOP8_EMULATED = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_NF4_BACKWARD_COOP8_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_BACKWARD_W_COOP8_EMULATED = "matmul_backward_w_t128" as "matmul_backward_w_t128.coop8.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl")];
    MATMUL_Q4_0_COOP8_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop8.q4_0.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_COOP8_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8.q4_0.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_1_COOP8_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop8.q4_1.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_COOP8_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop8.q4_1.emulated"
        [("common/tile128.wgsl", "common/coop8.wgsl"), ("common/coop8_mma.wgsl", "common/coop8_mma_emulated.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    // GGUF's Q4_0 held as it is: every NF4 kernel with Q4_0's linear code book
    // (shaders/common/q4_0_code.wgsl) and blocks of 32.
    MATMUL_Q4_0 = "matmul_nf4" as "matmul_nf4.q4_0" [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATVEC_Q4_0 = "matvec_nf4" as "matvec_nf4.q4_0" [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD = "matmul_nf4_backward" as "matmul_nf4_backward.q4_0"
        [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_SIMD8 = "matmul_nf4_simd8" as "matmul_nf4_simd8.q4_0" [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATVEC_Q4_0_SIMD8 = "matmul_nf4_simd8" as "matmul_nf4_simd8.one_row.q4_0"
        [("common/simd8_forward.wgsl", "common/simd8_one_row.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_SIMD8 = "matmul_nf4_backward_simd8" as "matmul_nf4_backward_simd8.q4_0"
        [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_T128 = "matmul_nf4_t128" as "matmul_nf4_t128.q4_0" [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_T128 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.q4_0"
        [("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_COOP16 = "matmul_nf4_t128" as "matmul_nf4_t128.coop16.q4_0"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_COOP16 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16.q4_0"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_COOP16_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop16.q4_0.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl"),
         ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_COOP16_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16.q4_0.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl"),
         ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    // GGUF's Q4_1 held as it is: every NF4 kernel with Q4_1's codes and each block's scale and
    // minimum (shaders/common/q4_1_code.wgsl), blocks of 32.
    MATMUL_Q4_1 = "matmul_nf4" as "matmul_nf4.q4_1" [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATVEC_Q4_1 = "matvec_nf4" as "matvec_nf4.q4_1" [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD = "matmul_nf4_backward" as "matmul_nf4_backward.q4_1"
        [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_SIMD8 = "matmul_nf4_simd8" as "matmul_nf4_simd8.q4_1" [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATVEC_Q4_1_SIMD8 = "matmul_nf4_simd8" as "matmul_nf4_simd8.one_row.q4_1"
        [("common/simd8_forward.wgsl", "common/simd8_one_row.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_SIMD8 = "matmul_nf4_backward_simd8" as "matmul_nf4_backward_simd8.q4_1"
        [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_T128 = "matmul_nf4_t128" as "matmul_nf4_t128.q4_1" [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_T128 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.q4_1"
        [("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_COOP16 = "matmul_nf4_t128" as "matmul_nf4_t128.coop16.q4_1"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_COOP16 = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16.q4_1"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_COOP16_EMULATED = "matmul_nf4_t128" as "matmul_nf4_t128.coop16.q4_1.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl"),
         ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_COOP16_EMULATED = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.coop16.q4_1.emulated"
        [("common/tile128.wgsl", "common/coop16.wgsl"), ("common/coop_mma.wgsl", "common/coop_mma_emulated.wgsl"),
         ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    // The half family: coop16's set (the tile128 forward kernels, and the input gradients
    // through frozen weights) on the f16-arithmetic core (shaders/common/tile128_half.wgsl), for
    // adapters with f16 in shaders and no matrix units.
    MATMUL_HALF = "matmul_t128" as "matmul_t128.half" [("common/tile128.wgsl", "common/tile128_half.wgsl")];
    MATMUL_F16_HALF = "matmul_f16_t128" as "matmul_f16_t128.half" [("common/tile128.wgsl", "common/tile128_half.wgsl")];
    MATMUL_NF4_HALF = "matmul_nf4_t128" as "matmul_nf4_t128.half" [("common/tile128.wgsl", "common/tile128_half.wgsl")];
    MATMUL_F16_BACKWARD_HALF = "matmul_f16_backward_t128" as "matmul_f16_backward_t128.half"
        [("common/tile128.wgsl", "common/tile128_half.wgsl")];
    MATMUL_NF4_BACKWARD_HALF = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.half"
        [("common/tile128.wgsl", "common/tile128_half.wgsl")];
    MATMUL_Q4_0_HALF = "matmul_nf4_t128" as "matmul_nf4_t128.half.q4_0"
        [("common/tile128.wgsl", "common/tile128_half.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_0_BACKWARD_HALF = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.half.q4_0"
        [("common/tile128.wgsl", "common/tile128_half.wgsl"), ("common/nf4_code.wgsl", "common/q4_0_code.wgsl")];
    MATMUL_Q4_1_HALF = "matmul_nf4_t128" as "matmul_nf4_t128.half.q4_1"
        [("common/tile128.wgsl", "common/tile128_half.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
    MATMUL_Q4_1_BACKWARD_HALF = "matmul_nf4_backward_t128" as "matmul_nf4_backward_t128.half.q4_1"
        [("common/tile128.wgsl", "common/tile128_half.wgsl"), ("common/nf4_code.wgsl", "common/q4_1_code.wgsl"), ("common/nf4_block.wgsl", "common/q4_1_block.wgsl")];
}

const SNIPPETS: &[(&str, &str)] = &[
    ("common/nf4.wgsl", include_str!("../common/nf4.wgsl")),
    ("common/nf4_code.wgsl", include_str!("../common/nf4_code.wgsl")),
    ("common/q4_0_code.wgsl", include_str!("../common/q4_0_code.wgsl")),
    ("common/q4_1_code.wgsl", include_str!("../common/q4_1_code.wgsl")),
    ("common/nf4_block.wgsl", include_str!("../common/nf4_block.wgsl")),
    ("common/block_size.wgsl", include_str!("../common/block_size.wgsl")),
    ("common/lora_dx.wgsl", include_str!("../common/lora_dx.wgsl")),
    ("common/gathered_row.wgsl", include_str!("../common/gathered_row.wgsl")),
    ("common/q4_1_block.wgsl", include_str!("../common/q4_1_block.wgsl")),
    ("common/tile128.wgsl", include_str!("../common/tile128.wgsl")),
    ("common/tile64.wgsl", include_str!("../common/tile64.wgsl")),
    ("common/tile_narrow.wgsl", include_str!("../common/tile_narrow.wgsl")),
    ("common/tile_stage.wgsl", include_str!("../common/tile_stage.wgsl")),
    ("common/tile_fetch.wgsl", include_str!("../common/tile_fetch.wgsl")),
    ("common/tile_nf4.wgsl", include_str!("../common/tile_nf4.wgsl")),
    ("common/coop16.wgsl", include_str!("../common/coop16.wgsl")),
    ("common/tile128_half.wgsl", include_str!("../common/tile128_half.wgsl")),
    ("common/coop_mma.wgsl", include_str!("../common/coop_mma.wgsl")),
    ("common/coop_mma_emulated.wgsl", include_str!("../common/coop_mma_emulated.wgsl")),
    ("common/coop8.wgsl", include_str!("../common/coop8.wgsl")),
    ("common/coop8_mma.wgsl", include_str!("../common/coop8_mma.wgsl")),
    ("common/coop8_mma_emulated.wgsl", include_str!("../common/coop8_mma_emulated.wgsl")),
    ("common/attention_tiles.wgsl", include_str!("../common/attention_tiles.wgsl")),
    ("common/attention_rows.wgsl", include_str!("../common/attention_rows.wgsl")),
    ("common/attention_rows_shared.wgsl", include_str!("../common/attention_rows_shared.wgsl")),
    ("common/matmul_dw.wgsl", include_str!("../common/matmul_dw.wgsl")),
    ("common/matmul.wgsl", include_str!("../common/matmul.wgsl")),
    ("common/matvec.wgsl", include_str!("../common/matvec.wgsl")),
    ("common/matvec_reduce.wgsl", include_str!("../common/matvec_reduce.wgsl")),
    ("common/matvec_reduce_subgroup.wgsl", include_str!("../common/matvec_reduce_subgroup.wgsl")),
    ("common/lora_table.wgsl", include_str!("../common/lora_table.wgsl")),
    ("common/matmul_forward.wgsl", include_str!("../common/matmul_forward.wgsl")),
    ("common/matmul_dx.wgsl", include_str!("../common/matmul_dx.wgsl")),
    ("common/embedding.wgsl", include_str!("../common/embedding.wgsl")),
    ("common/params.wgsl", include_str!("../common/params.wgsl")),
    ("common/rms_norm_one.wgsl", include_str!("../common/rms_norm_one.wgsl")),
    ("common/rms_norm_pair.wgsl", include_str!("../common/rms_norm_pair.wgsl")),
    ("common/rms_norm_inv.wgsl", include_str!("../common/rms_norm_inv.wgsl")),
    ("common/rms_norm_inv_kept.wgsl", include_str!("../common/rms_norm_inv_kept.wgsl")),
    ("common/rms_norm_grad_one.wgsl", include_str!("../common/rms_norm_grad_one.wgsl")),
    ("common/rms_norm_grad_pair.wgsl", include_str!("../common/rms_norm_grad_pair.wgsl")),
    ("common/matmul_store.wgsl", include_str!("../common/matmul_store.wgsl")),
    ("common/simd8.wgsl", include_str!("../common/simd8.wgsl")),
    ("common/simd8_forward.wgsl", include_str!("../common/simd8_forward.wgsl")),
    ("common/simd8_one_row.wgsl", include_str!("../common/simd8_one_row.wgsl")),
    ("common/gates.wgsl", include_str!("../common/gates.wgsl")),
    ("common/dense_rows.wgsl", include_str!("../common/dense_rows.wgsl")),
    ("common/simd8_dx.wgsl", include_str!("../common/simd8_dx.wgsl")),
    ("common/attention_simd8.wgsl", include_str!("../common/attention_simd8.wgsl")),
    ("common/softcap.wgsl", include_str!("../common/softcap.wgsl")),
    ("common/ce_unweighted.wgsl", include_str!("../common/ce_unweighted.wgsl")),
    ("common/ce_weighted.wgsl", include_str!("../common/ce_weighted.wgsl")),
    ("common/dpo_sums.wgsl", include_str!("../common/dpo_sums.wgsl")),
];

/// The plain-WGSL twin of a cooperative-matrix kernel (`NAME.emulated`, see
/// shaders/common/coop_mma_emulated.wgsl).
pub fn emulated_twin(shader: &Shader) -> Result<&'static Shader> {
    let name = format!("{}.emulated", shader.name);
    ALL_SHADERS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ShaderError(format!("shader {} has no emulated twin", shader.name)))
}

/// Expands a shader's source: `#include "common/x.wgsl"` lines (recursively, each snippet once),
/// `#for VAR in A..B` ... `#end` blocks (see [`unroll`]), and the `const` overrides of a variant.
pub fn expand(shader: &Shader) -> Result<String> {
    let mut out = String::with_capacity(shader.source.len());
    let mut included = Vec::new();
    include_into(shader, shader.source, &mut out, &mut included)?;
    let mut out = unroll(shader.name, &out)?;
    // `enable` directives must open a WGSL module; a snippet that needs one (an extension such
    // as cooperative matrices) declares it where it is, and it moves to the top.
    let (enables, rest): (Vec<&str>, Vec<&str>) = out.lines().partition(|l| l.trim_start().starts_with("enable "));
    if !enables.is_empty() {
        let mut hoisted: Vec<&str> = Vec::new();
        for e in enables {
            if !hoisted.contains(&e.trim()) {
                hoisted.push(e.trim());
            }
        }
        out = hoisted.iter().chain(&rest).fold(String::with_capacity(out.len()), |mut o, l| {
            o.push_str(l);
            o.push('\n');
            o
        });
    }
    for (name, value) in shader.defines.iter().filter(|(name, _)| !name.ends_with(".wgsl")) {
        let prefix = format!("const {name}: u32 = ");
        let start = out
            .find(&prefix)
            .ok_or_else(|| ShaderError(format!("shader {}: no `{prefix}...` to override", shader.name)))?;
        let end = start
            + out[start..]
                .find(';')
                .ok_or_else(|| ShaderError(format!("shader {}: unterminated const", shader.name)))?;
        out.replace_range(start..end, &format!("{prefix}{value}"));
    }
    Ok(out)
}

fn include_into(shader: &Shader, source: &str, out: &mut String, included: &mut Vec<&'static str>) -> Result<()> {
    for line in source.lines() {
        if let Some(rest) = line.trim().strip_prefix("#include") {
            let name = rest.trim().trim_matches('"');
            // A variant may swap one snippet for another (a matmul core for another family's).
            let name = shader.defines.iter().find(|(from, _)| *from == name).map_or(name, |(_, to)| *to);
            let snippet = SNIPPETS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| ShaderError(format!("shader {}: unknown include {name:?}", shader.name)))?;
            if !included.contains(&snippet.0) {
                included.push(snippet.0);
                include_into(shader, snippet.1, out, included)?;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

/// Unrolls `#for VAR in A..B` ... `#end` blocks: the lines between are written once for each
/// value of VAR, with `{VAR}` and `{VAR op N}` (op one of `+ - * / %`) replaced by the integer.
/// WGSL has no way to make a subgroup lane index or a register name from a loop counter, and the
/// register-tiled kernels need both.
pub fn unroll(name: &str, source: &str) -> Result<String> {
    let bad = |what: String| ShaderError(format!("shader {name}: {what}"));
    let mut out = String::with_capacity(source.len());
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let Some(head) = line.trim().strip_prefix("#for ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (var, range) = head.split_once(" in ").ok_or_else(|| bad(format!("malformed {line:?}")))?;
        let (a, b) = range.trim().split_once("..").ok_or_else(|| bad(format!("malformed range in {line:?}")))?;
        let parse = |t: &str| t.trim().parse::<i64>().map_err(|_| bad(format!("bad bound {t:?} in {line:?}")));
        let (a, b, var) = (parse(a)?, parse(b)?, var.trim());
        let mut body = Vec::new();
        loop {
            match lines.next() {
                Some(l) if l.trim() == "#end" => break,
                Some(l) if l.trim().starts_with("#for ") => return Err(bad("nested #for".into())),
                Some(l) => body.push(l),
                None => return Err(bad(format!("{line:?} has no #end"))),
            }
        }
        for v in a..b {
            for l in &body {
                out.push_str(&substitute(l, var, v));
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// Replaces `{var}` and `{var op N}` in one line; other braces are left alone.
fn substitute(line: &str, var: &str, v: i64) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let value = after.find('}').and_then(|j| {
            let expr = after[..j].trim();
            let tail = expr.strip_prefix(var)?.trim();
            let value = if tail.is_empty() {
                v
            } else {
                let n: i64 = tail[1..].trim().parse().ok()?;
                match tail.as_bytes()[0] {
                    b'+' => v + n,
                    b'-' => v - n,
                    b'*' => v * n,
                    b'/' if n != 0 => v / n,
                    b'%' if n != 0 => v % n,
                    _ => return None,
                }
            };
            Some((value, j))
        });
        match value {
            Some((value, j)) => {
                out.push_str(&value.to_string());
                rest = &after[j + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

macro_rules! params {
    ($(#[$m:meta])* $name:ident { $($f:ident : $t:ty),* $(,)? } = $size:literal) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Pod, Zeroable, Default)]
        pub struct $name { $(pub $f: $t),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
    };
}

params!(/// `embedding.wgsl`
    EmbeddingParams { n_tokens: u32, dim: u32, row_start: u32, row_count: u32, scale: f32, _pad0: u32, _pad1: u32,
        _pad2: u32 } = 32);
params!(/// `rms_norm.wgsl` (n_rows2: the pair variant's second tensor)
    RmsNormParams { n_rows: u32, dim: u32, eps: f32, n_rows2: u32 } = 16);
params!(/// `rope.wgsl` (and its `rope_backward` variant)
    RopeParams { n_tokens: u32, n_heads: u32, head_dim: u32, pos_offset: u32, rot_dim: u32, n_kv_heads: u32,
        _pad1: u32, _pad2: u32 } = 32);
params!(/// `dropout.wgsl`
    DropoutParams { n: u32, seed: u32, threshold: u32, scale: f32 } = 16);
params!(/// `silu_mul.wgsl`, `gelu_mul.wgsl` and `add.wgsl`
    ElementwiseParams { n: u32, _pad0: u32, _pad1: u32, _pad2: u32 } = 16);
params!(/// `cross_entropy.wgsl` and `cross_entropy_backward.wgsl`
    CrossEntropyParams { n_rows: u32, vocab: u32, grad_scale: f32, row_offset: u32, softcap: f32, _pad0: u32,
        _pad1: u32, _pad2: u32 } = 32);
params!(/// `logit_softcap.wgsl`
    SoftcapParams { n: u32, cap: f32, _pad0: u32, _pad1: u32 } = 16);
params!(/// `dpo.wgsl` and `dpo_logps.wgsl`
    DpoParams { n_pairs: u32, length_normalized: u32, ipo: u32, _pad: u32, beta: f32, a: f32, b: f32, grad_scale: f32 }
        = 32);
/// [`MatmulParams::x_op`]: what a one-row product fuses into reading its input row, as
/// `common/params.wgsl` names the values (the x as it is, RMS-normed, or gated by SiLU or GELU),
/// and what a weight gradient's loader applies to x (the gates, or a norm whose rows' 1/rms
/// the forward norm kept: [`X_RMS_KEPT`]).
pub const X_AS_IS: u32 = 0;
pub const X_RMS_NORM: u32 = 1;
pub const X_SILU_MUL: u32 = 2;
pub const X_GELU_MUL: u32 = 3;
pub const X_RMS_KEPT: u32 = 4;

params!(/// every matmul kernel (`common/matmul.wgsl`)
    MatmulParams {
        m: u32, n: u32, k: u32, has_bias: u32, y_stride: u32, y_col_offset: u32, y_seg_rows: u32, accumulate: u32,
        alpha: f32, w_offset: u32, dy_stride: u32, dy_col_offset: u32, split_k: u32, x_op: u32, norm_eps: f32,
        lora_rank: u32, lora_b: u32, lora_scale: f32, seg_rows: u32, w_offset1: u32, w_offset2: u32, lora_h: u32,
        x_stride: u32, x_col_offset: u32, lora_h_stride: u32, lora_seg_rows: u32, lora_w1: u32, lora_w2: u32,
        y_offset1: u32, y_offset2: u32, _pad0: u32, _pad1: u32,
    } = 128);
params!(/// `adamw.wgsl`
    AdamwParams {
        n: u32, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, grad_scale: f32, max_grad_norm: f32,
        table_len: u32, _pad0: u32, _pad1: u32, _pad2: u32,
    } = 48);
params!(/// `grad_norm.wgsl`
    GradNormParams { n: u32, final_pass: u32, n_groups: u32, _pad: u32 } = 16);
params!(/// `argmax.wgsl`
    ArgmaxParams { n: u32, final_pass: u32, n_groups: u32, _pad: u32 } = 16);
params!(/// `top_k.wgsl`
    TopKParams { n: u32, k: u32, final_pass: u32, chunk: u32 } = 16);
params!(/// `lora_rows.wgsl`
    LoraRowsParams { n_rows: u32, n_in: u32, n_out: u32, width: u32, table_row: u32, modules: u32, h_stride: u32,
        h_col: u32 } = 32);
params!(/// `kv_write.wgsl`
    KvWriteParams { n_rows: u32, width: u32, first: u32, ranges: u32 } = 16);
params!(/// `attention.wgsl`
    AttentionParams {
        n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32, pos_offset: u32, kv_stride: u32, scale: f32,
        softcap: f32, split_keys: u32, n_splits: u32, head_split: u32, key_ends: u32,
    } = 48);

#[cfg(test)]
mod tests {
    /// The x_op values here are the ones the kernels compare with.
    #[test]
    fn x_ops_match_the_wgsl_constants() {
        let wgsl = include_str!("../common/params.wgsl");
        for (name, v) in [
            ("X_AS_IS", super::X_AS_IS),
            ("X_RMS_NORM", super::X_RMS_NORM),
            ("X_SILU_MUL", super::X_SILU_MUL),
            ("X_GELU_MUL", super::X_GELU_MUL),
            ("X_RMS_KEPT", super::X_RMS_KEPT),
        ] {
            assert!(wgsl.contains(&format!("const {name}: u32 = {v}u;")), "{name} = {v} is not in common/params.wgsl");
        }
    }
}
