//! Kernel families and the table that picks one for each op from what the adapter is.
//!
//! A family is a set of kernels that compute the same products as every other family, blocked
//! for one kind of hardware:
//!
//! | family | matmul | attention | picked for |
//! | --- | --- | --- | --- |
//! | `portable` | 64 x 64 tiles, 4 x 4 a thread | a workgroup per (query, head) | anything else |
//! | `simd8` | 32 x 32 blocks in 8-lane registers | 8 queries a workgroup, heads of up to 256 dims (a multiple of 4; else portable) | a CPU adapter with 8-lane subgroups (lavapipe) |
//! | `tile128` | 128 x 128 tiles, 8 x 8 a thread, prefetched, NF4 a word at a time | 64 queries (forward, dQ) or 64 keys (dK, dV) a workgroup, register-tiled, rows reduced with subgroup shuffles (25 KiB; else portable) | a GPU with 16,960 bytes of workgroup memory; from 8,768, every product on 64 x 64 blocks (tile64) |
//! | `coop16` | forward and input gradients through frozen weights: 128 x 128 tiles of 16 x 16 x 16 f16 cooperative-matrix fragments, f32 sums, each row of the activations or gradients scaled by a power of two into f16's range; other gradients: `tile128` | as `tile128` | a GPU that lists that configuration, once its self-test passes |
//! | `coop8` | every many-row product: 128 x 128 tiles of 8 x 8 x 8 f32 cooperative-matrix fragments (Metal's simdgroup matrices) | as `tile128` | a GPU that lists that configuration and not coop16's, once its self-test passes |
//! | `half` | coop16's products with f16 arithmetic and no matrix units: tile128's 128 x 128 tiles staged as f16, each thread's 8 x 8 products multiplied in f16 and summed in f16 over runs of 8 steps, then in f32; rows scaled by powers of two into f16's range, a step with a weight of 2 or more summed exactly in f32; LoRA's narrow products (x A^T too) and other gradients: `tile128` | as `tile128` | forced only (`EDGETUNE_KERNELS=half`), on a GPU with f16 in shaders, until a GPU has measured it |
//!
//! A product whose grid of 128 x 128 tiles is small (fewer than [`TILE128_MIN_GROUPS`]
//! workgroups) runs on 64 x 64 blocks in tile128, and for coop16's and half's gradients:
//! tile128's kernels on the `tile64` core (4 x 4 a thread, with tile128's staging, prefetch and
//! NF4 words); coop16's and half's own products stay on their tiles (their split reductions
//! fill the GPU). Before that, a dense product with a side of at most [`NARROW_MAX`] (LoRA's
//! x A^T, dh = dy B, dA and dB) runs there (and in half, and for coop16's gradients) on
//! tile128's narrow blocks of 256 x 16 or 16 x 256 (`.narrow`, `.narrow_rows`), which leave no outputs
//! idle where 64 x 64 blocks leave three quarters at a rank of 16.
//! One-row products (decoding) run portable's `matvec` kernels in every family but simd8, which
//! has its own; the GPU families (tile128, coop16, coop8, half) run them with their reduction in
//! subgroup operations (`.subgroup`) where the adapter has them.
//! A family that has no kernel of its own for an op uses the portable one (coop16: tile128 for
//! the LoRA input gradients and the weight gradients, reductions over tokens of two
//! gradient-sized operands; half likewise). `GpuOptions::kernels` or
//! `EDGETUNE_KERNELS` forces a family (tests run each one the adapter can run); forcing one the
//! adapter cannot run is an error, never a silent fallback. coop16 and coop8 are used only
//! after a start-up self-test on the GPU (`gpu/probe.rs`): NF4 matmuls against exact sums
//! within the bound of their rounding (f16 operands for coop16, f32 for coop8). When it fails,
//! the adapter gets the family the table picks without matrix units, and the report says why.

use serde::Serialize;

use crate::error::{Error, Result};

/// A family of kernels (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    /// Plain WGSL that every adapter runs: 64 x 64 tiles, 4 x 4 a thread.
    Portable,
    /// 32 x 32 blocks in 8-lane registers, for CPU adapters with 8-lane subgroups (lavapipe).
    Simd8,
    /// 128 x 128 tiles, 8 x 8 a thread, for GPUs with 16,960 bytes of workgroup memory (from
    /// 8,768, every product on its 64 x 64 blocks).
    Tile128,
    /// Cooperative-matrix (tensor core) products on f16 operands with f32 sums.
    Coop16,
    /// Cooperative-matrix products of 8 x 8 x 8 f32 fragments (Apple GPUs' simdgroup matrices).
    Coop8,
    /// coop16's products in f16 arithmetic without matrix units (tile128's tiles staged as f16,
    /// products summed in f16 over runs of 8 steps, then in f32).
    Half,
}

impl KernelFamily {
    /// Every family.
    pub const ALL: [KernelFamily; 6] = [
        KernelFamily::Portable,
        KernelFamily::Simd8,
        KernelFamily::Tile128,
        KernelFamily::Coop16,
        KernelFamily::Coop8,
        KernelFamily::Half,
    ];

    /// Its name, as `EDGETUNE_KERNELS` and the reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::Portable => "portable",
            KernelFamily::Simd8 => "simd8",
            KernelFamily::Tile128 => "tile128",
            KernelFamily::Coop16 => "coop16",
            KernelFamily::Coop8 => "coop8",
            KernelFamily::Half => "half",
        }
    }

    /// Whether its one-row products (decoding) are portable's kernels with their reduction in
    /// subgroup operations, where the adapter has them (the GPU families; simd8 has its own,
    /// and portable runs on every adapter as it is).
    pub fn reduces_rows_in_subgroups(self) -> bool {
        matches!(self, KernelFamily::Tile128 | KernelFamily::Coop16 | KernelFamily::Coop8 | KernelFamily::Half)
    }

    /// Whether the family runs the forward products and the input gradients through frozen
    /// weights on kernels of its own and leaves the other gradients to tile128's (coop16, half).
    pub fn leaves_gradients_to_tile128(self) -> bool {
        matches!(self, KernelFamily::Coop16 | KernelFamily::Half)
    }

    /// Whether the family multiplies on the adapter's matrix units (wgpu's experimental
    /// cooperative matrices), and so runs only after a self-test (`gpu/probe.rs`).
    pub fn uses_matrix_units(self) -> bool {
        matches!(self, KernelFamily::Coop16 | KernelFamily::Coop8)
    }
}

impl std::fmt::Display for KernelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelFamily {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        named(&KernelFamily::ALL, KernelFamily::name, s, "kernel family")
    }
}

/// The one of `all` whose `name` is `s` (any case, spaces around it ignored), else an error on
/// `what` that lists the names.
pub(crate) fn named<T: Copy>(all: &[T], name: fn(T) -> &'static str, s: &str, what: &str) -> Result<T> {
    all.iter().copied().find(|&t| name(t).eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
        Error::invalid(what, format!("{s:?} is not one of {}", names.join(", ")))
    })
}

/// The family each op uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Kernels {
    /// The family asked for or picked, which names the set.
    pub family: KernelFamily,
    /// Many-row forward matmuls (one-row products, when decoding, use the matvec kernels of
    /// `portable` or `simd8`).
    pub matmul: KernelFamily,
    /// Many-row input and weight gradients (coop16: the input gradients through frozen f16 and
    /// NF4 weights; the LoRA and weight gradients use tile128; coop8: all of them).
    pub matmul_grad: KernelFamily,
    /// Attention forward and backward.
    pub attention: KernelFamily,
    /// Products whose grid of 128 x 128 tiles would have fewer workgroups than this run on
    /// 64 x 64 blocks (four times the workgroups), tile128's kernels on its `tile64` core: in the
    /// tile128 family, and for coop16's gradients. 0 keeps tile128 for every product. See
    /// [`TILE128_MIN_GROUPS`]. [`TILE64_ONLY`] (`u32::MAX`) runs every product on them: the
    /// table's value for tile128 on an adapter whose workgroup memory holds tile64's blocks and
    /// not tile128's. The same small-grid threshold splits the blocked attention's
    /// dK/dV pass by query head under GQA ([`crate::gpu::launch::head_split`]).
    pub tile128_min_groups: u32,
    /// Dense products with a side of at most this many rows or columns (LoRA's x A^T, dh = dy B,
    /// dA and dB) run on blocks of 256 x 16 or 16 x 256, tile128's kernels on its `narrow`
    /// core, in the tile128 and half families and for coop16's gradients, whatever their grid. 0 runs none
    /// there. See [`NARROW_MAX`].
    pub narrow_max: u32,
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (matmul {}, matmul gradients {}, attention {})",
            self.family, self.matmul, self.matmul_grad, self.attention
        )?;
        let tiles128 = [self.matmul, self.matmul_grad]
            .iter()
            .any(|k| *k == KernelFamily::Tile128 || k.leaves_gradients_to_tile128());
        // coop16's and half's own products stay on their 128 x 128 tiles whatever the threshold;
        // only the gradients they leave to tile128's kernels move to 64 x 64 blocks.
        let (all, some) = if self.matmul.leaves_gradients_to_tile128() {
            ("tile128's products (LoRA and weight gradients) all", "tile128's products (LoRA and weight gradients)")
        } else {
            ("every product", "products")
        };
        if tiles128 && self.narrow_max > 0 {
            // coop16's forward products stay on the matrix units; half's narrow ones do not.
            let which = if self.matmul == KernelFamily::Coop16 { "gradients" } else { "products" };
            write!(f, "; LoRA's {which} (a side of at most {}) on 256 x 16 blocks", self.narrow_max)?;
        }
        if tiles128 && self.tile128_min_groups == TILE64_ONLY {
            write!(f, "; {all} on 64 x 64 blocks (tile64)")?;
        } else if tiles128 && self.tile128_min_groups > 0 {
            write!(f, "; {some} of fewer than {} 128 x 128 tiles on 64 x 64 (tile64)", self.tile128_min_groups)?;
        }
        Ok(())
    }
}

/// What the table reads of an adapter.
#[derive(Debug, Clone, Copy)]
pub struct AdapterFacts {
    /// Discrete, integrated, virtual or CPU.
    pub device_type: wgpu::DeviceType,
    /// Subgroup operations are available.
    pub subgroups: bool,
    /// Smallest and largest subgroup size.
    pub subgroup_size: (u32, u32),
    /// Workgroup memory a shader may use, in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations in one workgroup.
    pub max_invocations: u32,
    /// The adapter offers cooperative matrices with a 16 x 16 x 16 configuration of f16
    /// operands and f32 sums, and f16 in shaders.
    pub coop_16x16_f16: bool,
    /// f16 arithmetic in shaders (`SHADER_F16`).
    pub shader_f16: bool,
    /// The adapter offers cooperative matrices with an 8 x 8 x 8 configuration of f32 operands
    /// and f32 sums.
    pub coop_8x8_f32: bool,
}

/// Below this many workgroups of 128 x 128 tiles, a product runs on 64 x 64 blocks instead
/// (tile128's kernels on the `tile64` core; see [`Kernels::tile128_min_groups`];
/// `EDGETUNE_TILE128_MIN_GROUPS` or `GpuOptions::tile128_min_groups` sets another). On an H200
/// (132 multiprocessors), portable's whole training step (64 x 64 tiles) was faster than
/// tile128's for all three models measured at 512 tokens (1.2 to 2.4 times), where every
/// product but the LM head's has 4 rows of at most 64 such tiles: a grid that leaves most of a
/// large GPU idle. 512 is the grid the split-K rule fills
/// to as well (a large GPU runs a few hundred workgroups at once); the bench script measures
/// 0 beside it, so that a GPU run can set it.
pub const TILE128_MIN_GROUPS: u32 = 512;

/// The widest side a dense product may have to run on tile128's narrow blocks, 256 x 16 or
/// 16 x 256 (the `.narrow` and `.narrow_rows` kernels; see [`Kernels::narrow_max`];
/// `EDGETUNE_NARROW_MAX` or `GpuOptions::narrow_max` sets another): up to 48 (a rank-16
/// adapter's x A^T for q, k and v) they do less padded work than 64 x 64 blocks, which leave
/// three quarters of their outputs idle for a side of 16; at 64 the two do the same, and the
/// square blocks read each operand fewer times.
pub const NARROW_MAX: u32 = 48;

/// [`Kernels::tile128_min_groups`] that puts every product on 64 x 64 blocks (tile64).
pub const TILE64_ONLY: u32 = u32::MAX;

/// Workgroup memory the tile128 kernels declare: two (16, 132) f32 tiles and the NF4 code book.
/// `tests/kernels.rs` checks each of these constants against what the kernels declare
/// ([`crate::gpu::workgroup_bytes`]).
pub const TILE128_WORKGROUP_BYTES: u32 = 2 * 16 * 132 * 4 + 16 * 4;

/// Workgroup memory tile128's kernels on 64 x 64 blocks (the `.tile64` variants) declare: two
/// (16, 68) f32 tiles and the NF4 code book. An adapter with this much and less than
/// [`TILE128_WORKGROUP_BYTES`] runs the tile128 family with every product on them.
pub const TILE64_WORKGROUP_BYTES: u32 = 2 * 16 * 68 * 4 + 16 * 4;

/// Workgroup memory tile128's kernels on narrow blocks (the `.narrow` and `.narrow_rows`
/// variants) declare: (8, 256) and (8, 16) f32 tiles.
pub const NARROW_WORKGROUP_BYTES: u32 = 8 * 256 * 4 + 8 * 16 * 4;

/// Workgroup memory every kernel outside the tiled and cooperative-matrix families may use at
/// most: Vulkan's smallest `maxComputeSharedMemorySize`, and WebGPU's default, so that the
/// portable and simd8 kernels, the one-row products and the element-wise kernels run on any
/// adapter.
pub const PORTABLE_WORKGROUP_BYTES: u32 = 16384;

/// Workgroup memory the tile128 attention kernels may take: staged chunks of the operands
/// (8 KiB), a 64 x 64 block of probabilities or their gradients in padded rows, and the block's
/// key range (8 bytes, or dK/dV's 4), which a driver may place before the 16-byte-aligned
/// arrays and so pad to 16 (see [`crate::gpu::workgroup_bytes`]).
pub const ATTENTION_T128_WORKGROUP_BYTES: u32 = (512 + 64 * 17) * 16 + 16;

/// Workgroup memory the coop16 kernels declare: two (16, 136) f16 tiles, eight 16 x 16 f32
/// fragments, the 128 rows' scale exponents and the NF4 code book.
pub const COOP16_WORKGROUP_BYTES: u32 = 2 * 16 * 136 * 2 + 8 * 256 * 4 + 128 * 4 + 16 * 4;

/// Workgroup memory the half kernels declare: two (16, 132) f16 tiles, the 128 rows' scale
/// exponents, the scan's 256 maxima, the NF4 code book and the flag of a step with a large weight
/// (4 bytes, 8 at the tiles' alignment).
pub const HALF_WORKGROUP_BYTES: u32 = 2 * 16 * 132 * 2 + 128 * 4 + 256 * 4 + 16 * 4 + 8;

/// Workgroup memory the coop8 kernels declare: two (16, 136) f32 tiles (the epilogue's scratch
/// too) and the NF4 code book.
pub const COOP8_WORKGROUP_BYTES: u32 = 2 * 16 * 136 * 4 + 16 * 4;

// The order of the bounds that the table relies on: tile64 runs wherever the portable kernels
// do, the narrow blocks wherever tile64 does, and an adapter that holds the matrix units'
// families or the blocked attention holds tile128's tiles (so `kernels_of` gives only tile128
// 64 x 64 blocks throughout).
const _: () = assert!(TILE64_WORKGROUP_BYTES <= PORTABLE_WORKGROUP_BYTES);
const _: () = assert!(NARROW_WORKGROUP_BYTES <= TILE64_WORKGROUP_BYTES);
const _: () = assert!(TILE128_WORKGROUP_BYTES <= COOP16_WORKGROUP_BYTES);
const _: () = assert!(TILE128_WORKGROUP_BYTES <= COOP8_WORKGROUP_BYTES);
const _: () = assert!(TILE128_WORKGROUP_BYTES <= ATTENTION_T128_WORKGROUP_BYTES);
const _: () = assert!(HALF_WORKGROUP_BYTES <= TILE128_WORKGROUP_BYTES);

/// Why `family` cannot run on the adapter, or `None` when it can.
pub fn unsupported(family: KernelFamily, a: &AdapterFacts) -> Option<String> {
    match family {
        KernelFamily::Portable => None,
        KernelFamily::Simd8 => (a.device_type != wgpu::DeviceType::Cpu || !a.subgroups || a.subgroup_size != (8, 8))
            .then(|| {
                format!(
                    "needs a CPU adapter with 8-lane subgroups (this one: {:?}, subgroups {}, size {}..{})",
                    a.device_type, a.subgroups, a.subgroup_size.0, a.subgroup_size.1
                )
            }),
        KernelFamily::Tile128 => {
            (a.max_workgroup_storage < TILE64_WORKGROUP_BYTES || a.max_invocations < 256).then(|| {
                format!(
                    "needs {TILE64_WORKGROUP_BYTES} bytes of workgroup memory (its 64 x 64 blocks; \
                     {TILE128_WORKGROUP_BYTES} for 128 x 128 tiles) and 256 invocations a workgroup \
                     (this adapter: {} bytes, {} invocations)",
                    a.max_workgroup_storage, a.max_invocations
                )
            })
        }
        KernelFamily::Coop16 => {
            coop_unsupported("16 x 16 x 16 f16", "16x16 f16", a.coop_16x16_f16, COOP16_WORKGROUP_BYTES, a)
        }
        KernelFamily::Coop8 => coop_unsupported("8 x 8 x 8 f32", "8x8 f32", a.coop_8x8_f32, COOP8_WORKGROUP_BYTES, a),
        KernelFamily::Half => {
            let fits = a.max_workgroup_storage >= TILE128_WORKGROUP_BYTES && a.max_invocations >= 256;
            (!(a.shader_f16 && fits)).then(|| {
                format!(
                    "needs f16 in shaders (shader-f16), {TILE128_WORKGROUP_BYTES} bytes of workgroup memory (its \
                     gradients' 128 x 128 tiles) and 256 invocations a workgroup (this adapter: shader-f16 {}, {} \
                     bytes, {} invocations)",
                    a.shader_f16, a.max_workgroup_storage, a.max_invocations
                )
            })
        }
    }
}

/// Why a cooperative-matrix family cannot run: it needs its configuration (`listed`), 32-lane
/// subgroups and `bytes` of workgroup memory.
fn coop_unsupported(config: &str, short: &str, listed: bool, bytes: u32, a: &AdapterFacts) -> Option<String> {
    let lanes_32 = a.subgroups && a.subgroup_size.0 <= 32 && 32 <= a.subgroup_size.1;
    let fits = a.max_workgroup_storage >= bytes && a.max_invocations >= 256;
    (!(listed && lanes_32 && fits)).then(|| {
        format!(
            "needs cooperative matrices of {config} with f32 sums, 32-lane subgroups and {bytes} bytes of workgroup \
             memory (this adapter: cooperative {short} {listed}, subgroups {}..{}, {} bytes)",
            a.subgroup_size.0, a.subgroup_size.1, a.max_workgroup_storage
        )
    })
}

/// The table: the family each op uses on an adapter, or the forced one where it has a kernel
/// for the op. Forcing a family the adapter cannot run is an error.
pub fn choose(a: &AdapterFacts, forced: Option<KernelFamily>) -> Result<Kernels> {
    let family = match forced {
        Some(f) => {
            if let Some(why) = unsupported(f, a) {
                return Err(Error::invalid("kernel family", format!("{f} {why}")));
            }
            f
        }
        None if unsupported(KernelFamily::Simd8, a).is_none() => KernelFamily::Simd8,
        None if a.device_type == wgpu::DeviceType::Cpu => KernelFamily::Portable,
        None if unsupported(KernelFamily::Coop16, a).is_none() => KernelFamily::Coop16,
        None if unsupported(KernelFamily::Coop8, a).is_none() => KernelFamily::Coop8,
        None if unsupported(KernelFamily::Tile128, a).is_none() => KernelFamily::Tile128,
        None => KernelFamily::Portable,
    };
    Ok(kernels_of(family, a))
}

/// What each op uses in `family` on the adapter `a`.
pub fn kernels_of(family: KernelFamily, a: &AdapterFacts) -> Kernels {
    let blocked = if a.max_workgroup_storage >= ATTENTION_T128_WORKGROUP_BYTES {
        KernelFamily::Tile128
    } else {
        KernelFamily::Portable
    };
    let (matmul, matmul_grad, attention) = match family {
        KernelFamily::Simd8 => (family, family, family),
        KernelFamily::Coop16 | KernelFamily::Coop8 | KernelFamily::Tile128 | KernelFamily::Half => {
            (family, family, blocked)
        }
        KernelFamily::Portable => (family, family, family),
    };
    // Coop16 and coop8 need more workgroup memory than tile128, so only tile128 is picked where
    // its 128 x 128 tiles do not fit.
    let tile128_min_groups = if family == KernelFamily::Tile128 && a.max_workgroup_storage < TILE128_WORKGROUP_BYTES {
        TILE64_ONLY
    } else {
        TILE128_MIN_GROUPS
    };
    Kernels { family, matmul, matmul_grad, attention, tile128_min_groups, narrow_max: NARROW_MAX }
}

/// `kernels` with the small-grid threshold asked for (`GpuOptions::tile128_min_groups`, else
/// `EDGETUNE_TILE128_MIN_GROUPS`), where one was; `from` names where it came from. Asking for
/// 128 x 128 tiles (any threshold but [`TILE64_ONLY`]) on an adapter that cannot hold them is an
/// error, never a silent fallback.
pub fn with_min_groups(kernels: Kernels, a: &AdapterFacts, asked: Option<u32>, from: &str) -> Result<Kernels> {
    let Some(groups) = asked else { return Ok(kernels) };
    if kernels.tile128_min_groups == TILE64_ONLY && groups != TILE64_ONLY {
        return Err(Error::invalid(
            from,
            format!(
                "{groups} asks for 128 x 128 tiles on grids of {groups} workgroups or more, which need \
                 {TILE128_WORKGROUP_BYTES} bytes of workgroup memory; this adapter has {}, so every {} \
                 product runs on 64 x 64 blocks (leave it unset)",
                a.max_workgroup_storage, kernels.family
            ),
        ));
    }
    Ok(Kernels { tile128_min_groups: groups, ..kernels })
}

/// `EDGETUNE_TILE128_MIN_GROUPS`, if it is set (anything but a whole number is an error).
pub fn tile128_min_groups_from_env() -> Result<Option<u32>> {
    whole_from_env("EDGETUNE_TILE128_MIN_GROUPS", "workgroups")
}

/// `EDGETUNE_NARROW_MAX`, if it is set (anything but a whole number is an error).
pub fn narrow_max_from_env() -> Result<Option<u32>> {
    whole_from_env("EDGETUNE_NARROW_MAX", "rows or columns")
}

/// The whole number in environment variable `var`, if it is set; `what` names its unit in the
/// error for anything else.
fn whole_from_env(var: &str, what: &str) -> Result<Option<u32>> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::invalid(var, format!("{v:?} is not a whole number of {what}"))),
        _ => Ok(None),
    }
}

/// Whether `EDGETUNE_NO_SUBGROUPS=1` asks for a device without subgroup operations (`0` or
/// unset: no; anything else is an error that names the variable).
pub fn no_subgroups_from_env() -> Result<bool> {
    match std::env::var("EDGETUNE_NO_SUBGROUPS") {
        Ok(v) => match v.trim() {
            "" | "0" => Ok(false),
            "1" => Ok(true),
            other => Err(Error::invalid("EDGETUNE_NO_SUBGROUPS", format!("{other:?} is not 0 or 1"))),
        },
        Err(_) => Ok(false),
    }
}

/// The family forced by `EDGETUNE_KERNELS`, if it is set (an unknown name is an error).
pub fn from_env() -> Result<Option<KernelFamily>> {
    match std::env::var("EDGETUNE_KERNELS") {
        Ok(v) if !v.trim().is_empty() => {
            v.parse().map(Some).map_err(|e| Error::invalid("EDGETUNE_KERNELS", format!("{e}")))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(device_type: wgpu::DeviceType, sg: (u32, u32), storage: u32) -> AdapterFacts {
        AdapterFacts {
            device_type,
            subgroups: sg.0 > 0,
            subgroup_size: sg,
            max_workgroup_storage: storage,
            max_invocations: 1024,
            coop_16x16_f16: false,
            shader_f16: false,
            coop_8x8_f32: false,
        }
    }

    #[test]
    fn the_table_picks_a_family_for_each_kind_of_adapter() {
        use KernelFamily::*;
        use wgpu::DeviceType::*;
        let pick = |f: AdapterFacts| choose(&f, None).expect("a family");
        let k = |family, matmul, matmul_grad, attention| Kernels {
            family,
            matmul,
            matmul_grad,
            attention,
            tile128_min_groups: TILE128_MIN_GROUPS,
            narrow_max: NARROW_MAX,
        };
        assert_eq!(pick(facts(Cpu, (8, 8), 32768)), k(Simd8, Simd8, Simd8, Simd8));
        assert_eq!(pick(facts(Cpu, (4, 4), 32768)), k(Portable, Portable, Portable, Portable));
        assert_eq!(pick(facts(DiscreteGpu, (32, 32), 49152)), k(Tile128, Tile128, Tile128, Tile128));
        assert_eq!(pick(facts(IntegratedGpu, (8, 32), 32768)), k(Tile128, Tile128, Tile128, Tile128));
        // Enough for the matmul tiles, not for the attention blocks.
        assert_eq!(pick(facts(IntegratedGpu, (8, 32), 20480)), k(Tile128, Tile128, Tile128, Portable));
        // The WebGPU default of 16 KiB is too little for tile128's 128 x 128 tiles and enough for
        // its 64 x 64 blocks (tile64): every product on them, attention portable.
        let small = Kernels { tile128_min_groups: TILE64_ONLY, ..k(Tile128, Tile128, Tile128, Portable) };
        assert_eq!(pick(facts(IntegratedGpu, (0, 0), 16384)), small);
        assert_eq!(pick(facts(IntegratedGpu, (0, 0), TILE128_WORKGROUP_BYTES - 1)), small);
        assert_eq!(pick(facts(IntegratedGpu, (0, 0), TILE64_WORKGROUP_BYTES)), small);
        assert_eq!(
            pick(facts(IntegratedGpu, (0, 0), TILE64_WORKGROUP_BYTES - 1)),
            k(Portable, Portable, Portable, Portable)
        );
        assert_eq!(pick(facts(IntegratedGpu, (0, 0), TILE128_WORKGROUP_BYTES)), k(Tile128, Tile128, Tile128, Portable));
        assert!(small.to_string().ends_with("every product on 64 x 64 blocks (tile64)"), "{small}");
        // Matrix units: the forward products on them, the gradients in f32.
        let coop = AdapterFacts { coop_16x16_f16: true, ..facts(DiscreteGpu, (32, 32), 49152) };
        assert_eq!(pick(coop), k(Coop16, Coop16, Coop16, Tile128));
        // Its threshold moves only the gradients it leaves to tile128's kernels.
        let coop16 = |groups| Kernels { tile128_min_groups: groups, ..k(Coop16, Coop16, Coop16, Tile128) }.to_string();
        assert!(
            coop16(TILE64_ONLY)
                .ends_with("; tile128's products (LoRA and weight gradients) all on 64 x 64 blocks (tile64)")
        );
        assert!(coop16(512).ends_with(
            "; tile128's products (LoRA and weight gradients) of fewer than 512 128 x 128 tiles on 64 x 64 (tile64)"
        ));
        assert!(!coop16(0).contains("tile64"), "{}", coop16(0));
        assert!(coop16(0).contains("; LoRA's gradients (a side of at most 48) on 256 x 16 blocks"), "{}", coop16(0));
        let none = Kernels { narrow_max: 0, ..k(Tile128, Tile128, Tile128, Tile128) }.to_string();
        assert!(!none.contains("256 x 16"), "{none}");
        assert!(k(Tile128, Tile128, Tile128, Tile128).to_string().contains("LoRA's products (a side of at most 48)"));
        // Not with 64-lane subgroups only.
        assert_eq!(pick(AdapterFacts { subgroup_size: (64, 64), ..coop }).family, Tile128);
        // Apple's 8 x 8 f32 simdgroup matrices (Metal lists subgroups of 4..64): every many-row
        // product on them; coop16 where both are listed.
        let apple = AdapterFacts { coop_8x8_f32: true, ..facts(IntegratedGpu, (4, 64), 32768) };
        assert_eq!(pick(apple), k(Coop8, Coop8, Coop8, Tile128));
        assert_eq!(pick(AdapterFacts { coop_16x16_f16: true, ..apple }).family, Coop16);
        assert_eq!(pick(AdapterFacts { subgroup_size: (64, 64), ..apple }).family, Tile128);
        assert_eq!(pick(AdapterFacts { max_workgroup_storage: 16384, ..apple }), small);
    }

    #[test]
    fn a_forced_family_is_used_or_refused_with_the_reason() {
        let gpu = facts(wgpu::DeviceType::DiscreteGpu, (32, 32), 49152);
        assert_eq!(
            choose(&gpu, Some(KernelFamily::Portable)).expect("portable runs anywhere").matmul,
            KernelFamily::Portable
        );
        let err = choose(&gpu, Some(KernelFamily::Simd8)).expect_err("simd8 on a GPU").to_string();
        assert!(err.contains("simd8") && err.contains("8-lane"), "{err}");
        let tiny = facts(wgpu::DeviceType::IntegratedGpu, (32, 32), 8192);
        let err = choose(&tiny, Some(KernelFamily::Tile128)).expect_err("tile128 in 8 KiB").to_string();
        assert!(err.contains("tile128") && err.contains("8192") && err.contains("8768"), "{err}");
        // In 16 KiB, tile128 on 64 x 64 blocks: a threshold that asks for 128 x 128 tiles is
        // refused, naming where it came from; asking for tile64 throughout is what it does.
        let small = facts(wgpu::DeviceType::IntegratedGpu, (32, 32), 16384);
        let k = choose(&small, Some(KernelFamily::Tile128)).expect("tile128 on 64 x 64 blocks");
        assert_eq!(k.tile128_min_groups, TILE64_ONLY);
        let err = with_min_groups(k, &small, Some(0), "EDGETUNE_TILE128_MIN_GROUPS").expect_err("128 tiles");
        let err = err.to_string();
        assert!(err.contains("EDGETUNE_TILE128_MIN_GROUPS") && err.contains("16960") && err.contains("16384"), "{err}");
        assert_eq!(with_min_groups(k, &small, Some(TILE64_ONLY), "x").expect("tile64"), k);
        assert_eq!(with_min_groups(k, &small, None, "x").expect("the table's"), k);
        // Where the tiles fit, any threshold is taken as asked.
        let big = choose(&gpu, None).expect("tile128");
        assert_eq!(with_min_groups(big, &gpu, Some(0), "x").expect("0").tile128_min_groups, 0);
        let err = choose(&small, Some(KernelFamily::Coop8)).expect_err("coop8 in 16 KiB").to_string();
        assert!(err.contains("17472"), "{err}");
        let err = choose(&gpu, Some(KernelFamily::Coop16)).expect_err("no matrix units").to_string();
        assert!(err.contains("coop16") && err.contains("cooperative 16x16 f16 false"), "{err}");
        let err = choose(&gpu, Some(KernelFamily::Coop8)).expect_err("no matrix units").to_string();
        assert!(err.contains("coop8") && err.contains("cooperative 8x8 f32 false"), "{err}");
        assert_eq!("TILE128".parse::<KernelFamily>().expect("case-insensitive"), KernelFamily::Tile128);
        let err = "fast".parse::<KernelFamily>().expect_err("unknown").to_string();
        assert!(err.contains("portable, simd8, tile128, coop16, coop8, half"), "{err}");
        // half: f16 in shaders and tile128's tiles; never picked by the table.
        let err = choose(&gpu, Some(KernelFamily::Half)).expect_err("no shader-f16").to_string();
        assert!(err.contains("half") && err.contains("shader-f16 false"), "{err}");
        let f16 = AdapterFacts { shader_f16: true, ..gpu };
        assert_eq!(choose(&f16, None).expect("the table's").family, KernelFamily::Tile128);
        let half = choose(&f16, Some(KernelFamily::Half)).expect("half forced");
        assert_eq!(
            (half.matmul, half.matmul_grad, half.attention),
            (KernelFamily::Half, KernelFamily::Half, KernelFamily::Tile128)
        );
        assert!(
            half.to_string().contains("tile128's products (LoRA and weight gradients) of fewer than 512")
                && half.to_string().contains("LoRA's products (a side of at most 48) on 256 x 16"),
            "{half}"
        );
        let err = choose(&AdapterFacts { shader_f16: true, ..small }, Some(KernelFamily::Half)).expect_err("16 KiB");
        assert!(err.to_string().contains("16960") && err.to_string().contains("16384"), "{err}");
    }
}
