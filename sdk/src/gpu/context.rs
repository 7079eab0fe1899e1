//! The GPU context: adapter choice, device, queue, capability report and the pipeline cache.
//!
//! Adapter choice: `EDGETUNE_ADAPTER` (or [`GpuOptions::adapter`]) picks the first adapter whose
//! name contains the given text, case-insensitively; otherwise a discrete GPU is preferred, then
//! an integrated one, then a virtual one, then a CPU implementation such as Mesa's lavapipe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::family::{self, AdapterFacts, KernelFamily, Kernels};
use super::memory::{self, GpuMemory};
use super::profile::Profile;
use super::shaders::{Binding, Shader, expand, overrides_in};
use crate::error::{Error, Result};
use crate::gpu::dispatch::Commands;

/// How to choose the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Substring of the adapter name to use, or `#N` for the N-th adapter listed (from 0: for
    /// several GPUs of one name); `None` reads `EDGETUNE_ADAPTER`, then prefers a discrete GPU.
    pub adapter: Option<String>,
    /// Force a kernel family for every op that has one (see [`super::family`]); `None` reads
    /// `EDGETUNE_KERNELS`, else the table picks from the adapter. Tests use it to cover each
    /// family the adapter can run.
    pub kernels: Option<KernelFamily>,
    /// The longest the host waits for the GPU to finish submitted work before it gives up with
    /// an error; `None` reads `EDGETUNE_GPU_TIMEOUT_S`, else [`GPU_TIMEOUT`].
    pub gpu_timeout: Option<std::time::Duration>,
    /// Lets the cooperative-matrix families run on an adapter without cooperative matrices,
    /// their matrix operations written out in plain WGSL (shaders/common/coop_mma_emulated.wgsl
    /// for coop16, which also needs f16 arithmetic; shaders/common/coop8_mma_emulated.wgsl for
    /// coop8): everything else of those kernels (staging, row scales, split reductions,
    /// epilogue) and the start-up self-test run as on a GPU with matrix units. The table then
    /// picks coop16 where it can; force coop8 with [`GpuOptions::kernels`]. For tests on CPU
    /// adapters; no faster than tile128. A configuration the adapter has runs the real kernels.
    pub emulate_coop: bool,
    /// Products whose grid of 128 x 128 tiles has fewer workgroups than this use 64 x 64 tiles
    /// (see [`super::family::TILE128_MIN_GROUPS`]; 0: tile128 for every product); `None` reads
    /// `EDGETUNE_TILE128_MIN_GROUPS`, else that constant.
    pub tile128_min_groups: Option<u32>,
    /// Dense products with a side of at most this many rows or columns (LoRA's) run on
    /// tile128's narrow blocks (see [`super::family::NARROW_MAX`]; 0: none); `None` reads
    /// `EDGETUNE_NARROW_MAX`, else that constant.
    pub narrow_max: Option<u32>,
    /// Opens the device without subgroup operations even where the adapter has them, so that
    /// the kernels that do without them run (for a driver whose subgroup operations are broken,
    /// and for tests of those kernels); `EDGETUNE_NO_SUBGROUPS=1` does the same. The simd8
    /// family, which needs them, is then not picked.
    pub no_subgroups: bool,
    /// Opens the device with at most this many bytes of workgroup memory a workgroup (the
    /// adapter's own limit where that is less), so that the kernel table picks, and the context
    /// runs, what an adapter with that much gets: for a driver that overstates its limit, and
    /// for tests of the families small adapters get (Vulkan's minimum, and WebGPU's default, is
    /// 16,384 bytes).
    pub max_workgroup_storage: Option<u32>,
    /// Opens the device with at most this many bytes bound of a storage buffer at once (the
    /// adapter's own `max_storage_buffer_binding_size` where that is less), so that passes,
    /// batches and caches are sized as on a GPU with that limit: for a driver that overstates it,
    /// and for tests of what a GPU that binds little (WebGPU's default is 128 MiB) runs.
    pub max_storage_binding: Option<u64>,
    /// The checks wgpu adds to the kernels as it translates them (see [`ShaderChecks`]); `None`
    /// reads `EDGETUNE_SHADER_CHECKS`, else [`ShaderChecks::Bounds`].
    pub shader_checks: Option<ShaderChecks>,
    /// A file to which the context appends the name of each kernel the first time it dispatches
    /// it (compiling one does not count), a line each: the kernel that runs, so a
    /// cooperative-matrix kernel's emulated twin where [`GpuOptions::emulate_coop`] runs them.
    /// Several contexts and processes may share the file. A file that cannot be written makes
    /// the dispatch an error naming it. `None` reads `EDGETUNE_KERNEL_LOG` (empty: no log); the
    /// test script holds the log of the whole test run to every kernel.
    pub kernel_log: Option<std::path::PathBuf>,
}

/// The checks that wgpu adds to a kernel as it translates it for the driver (its
/// `ShaderRuntimeChecks`), which edgetune's kernels are written not to need.
///
/// By default wgpu gives every loop a 64-bit counter that breaks after 2^64 iterations (so that
/// a driver cannot treat an endless loop as unreachable), clamps indices into arrays (and into
/// buffers where the driver does not keep accesses in bounds itself) and guards integer
/// division by zero. The loop counters keep drivers from unrolling loops: wgpu's issue #7698
/// reports compute kernels 100 times slower with them (0.1 ms to 10 ms), and other projects on
/// wgpu (vello) turned them off. Every loop of edgetune's kernels ends after a number of
/// iterations set by its parameters, which a test holds each one to (`tests/kernels.rs`:
/// `every_kernel_loop_counts_up_or_down_to_a_bound_by_a_fixed_step`), so the default drops the
/// counters and keeps the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShaderChecks {
    /// Everything wgpu adds by default: loop counters, index and buffer bounds, division guards.
    All,
    /// Index and buffer bounds and division guards, no loop counters (the default).
    Bounds,
    /// Nothing added: an index out of bounds or a division by zero in a kernel would be
    /// undefined (the driver's own robust buffer access still applies where it has it). For
    /// measuring what the checks cost.
    None,
}

impl ShaderChecks {
    /// Every setting.
    pub const ALL: [ShaderChecks; 3] = [ShaderChecks::All, ShaderChecks::Bounds, ShaderChecks::None];

    /// Its name, as `EDGETUNE_SHADER_CHECKS` and the reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            ShaderChecks::All => "all",
            ShaderChecks::Bounds => "bounds",
            ShaderChecks::None => "none",
        }
    }

    /// What wgpu is asked to add.
    fn runtime_checks(self) -> wgpu::ShaderRuntimeChecks {
        match self {
            ShaderChecks::All => wgpu::ShaderRuntimeChecks::checked(),
            ShaderChecks::Bounds => {
                let mut checks = wgpu::ShaderRuntimeChecks::checked();
                checks.force_loop_bounding = false;
                checks
            }
            // What this leaves to the kernels is stated where the module is made (`compile`).
            ShaderChecks::None => wgpu::ShaderRuntimeChecks::unchecked(),
        }
    }

    /// The setting `EDGETUNE_SHADER_CHECKS` names, if it is set (anything else is an error).
    pub fn from_env() -> Result<Option<ShaderChecks>> {
        match std::env::var("EDGETUNE_SHADER_CHECKS") {
            Ok(v) if !v.trim().is_empty() => {
                family::named(&ShaderChecks::ALL, ShaderChecks::name, &v, "EDGETUNE_SHADER_CHECKS").map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl std::fmt::Display for ShaderChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ShaderChecks {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        family::named(&ShaderChecks::ALL, ShaderChecks::name, s, "shader checks")
    }
}

/// How long the host waits for the GPU by default: far longer than any one training step or
/// readback of a model that fits, short enough that a hung GPU is reported.
pub const GPU_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// What the chosen adapter is and can do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterReport {
    /// The adapter's name, as the driver gives it.
    pub name: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// The driver's name and version.
    pub driver: String,
    /// f16 arithmetic in shaders (`SHADER_F16`).
    pub shader_f16: bool,
    /// Subgroup operations (`SUBGROUP`).
    pub subgroups: bool,
    /// GPU timestamps (`TIMESTAMP_QUERY`), which `bench-train --profile` uses.
    pub timestamp_query: bool,
    /// Cooperative matrices (`EXPERIMENTAL_COOPERATIVE_MATRIX`).
    pub cooperative_matrix: bool,
    /// Smallest and largest subgroup size.
    pub subgroup_size: (u32, u32),
    /// The largest storage buffer one binding may see.
    pub max_storage_buffer_binding_size: u64,
    /// The largest buffer.
    pub max_buffer_size: u64,
    /// Workgroup memory a compute shader may use.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations in one workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// The kernel family each op uses (see [`super::family`]).
    pub kernels: Kernels,
    /// What the start-up self-test of a cooperative-matrix family (coop16 or coop8) found,
    /// where one ran (see gpu/probe.rs).
    pub coop_self_test: Option<String>,
    /// Whether the cooperative-matrix kernels run emulated (see [`GpuOptions::emulate_coop`]).
    pub coop_emulated: bool,
    /// What the family table read of the adapter.
    #[serde(skip)]
    pub facts: AdapterFacts,
    /// The family `GpuOptions::kernels` or `EDGETUNE_KERNELS` forced, if any.
    pub forced: Option<KernelFamily>,
    /// The GPU's memory, where the backend reports it (Vulkan does); `None` means unknown.
    pub memory: Option<GpuMemory>,
    /// The checks wgpu adds to the kernels (see [`ShaderChecks`]).
    pub shader_checks: ShaderChecks,
}

impl std::fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "adapter: {} ({}, {}, driver {})", self.name, self.backend, self.device_type, self.driver)?;
        writeln!(
            f,
            "features: shader-f16 {}, subgroups {} (size {}..{}), timestamp-query {}, cooperative-matrix {}",
            self.shader_f16,
            self.subgroups,
            self.subgroup_size.0,
            self.subgroup_size.1,
            self.timestamp_query,
            self.cooperative_matrix
        )?;
        let emulated = if self.coop_emulated { " (matrix operations emulated in plain WGSL)" } else { "" };
        writeln!(f, "kernels: {}{emulated}", self.kernels)?;
        writeln!(f, "shader checks: {}", self.shader_checks)?;
        if let Some(t) = &self.coop_self_test {
            writeln!(f, "cooperative-matrix self-test: {t}")?;
        }
        match self.memory {
            Some(GpuMemory { total_bytes, available_bytes: Some(free) }) => {
                writeln!(f, "memory: {} MiB, {} MiB free", total_bytes >> 20, free >> 20)?
            }
            Some(GpuMemory { total_bytes, available_bytes: None }) => {
                writeln!(f, "memory: {} MiB (no budget reported)", total_bytes >> 20)?
            }
            None => writeln!(f, "memory: not reported by this backend")?,
        }
        write!(
            f,
            "limits: storage binding {} MiB, buffer {} MiB, workgroup storage {} KiB, {} invocations/workgroup",
            self.max_storage_buffer_binding_size >> 20,
            self.max_buffer_size >> 20,
            self.max_compute_workgroup_storage_size >> 10,
            self.max_compute_invocations_per_workgroup
        )
    }
}

/// An open GPU device with its queue and compiled pipelines.
#[derive(Debug)]
pub struct GpuContext {
    adapter: wgpu::Adapter,
    /// The device, for creating buffers and pipelines.
    pub device: wgpu::Device,
    /// Crate-private: submissions go through [`GpuContext::submit`], which writes the kernel
    /// parameters first.
    pub(crate) queue: wgpu::Queue,
    /// What the adapter is and can do, and the kernel families chosen for it.
    pub report: AdapterReport,
    /// The device's limits (the adapter's own, not WebGPU's defaults).
    pub limits: wgpu::Limits,
    pipelines: Mutex<HashMap<&'static str, Compiled>>,
    /// The first error wgpu reported outside an error scope; surfaced by [`GpuContext::check`].
    uncaptured: std::sync::Arc<Mutex<Option<String>>>,
    /// Why the device was lost, if it was; surfaced by [`GpuContext::check`].
    lost: std::sync::Arc<Mutex<Option<String>>>,
    /// See [`GpuOptions::gpu_timeout`].
    pub(crate) gpu_timeout: std::time::Duration,
    /// The profile being gathered (see [`GpuContext::start_profiling`]).
    pub(crate) profile: Mutex<Option<Profile>>,
    /// What the GPU layer has created and recorded since the device was opened.
    pub(crate) counters: Counters,
    /// Scratch for split matmul reductions (see `GpuContext::split_scratch`), grown on demand.
    pub(crate) scratch: Mutex<Option<wgpu::Buffer>>,
    /// Staging buffer of small readbacks (see `GpuContext::read_f32`), made at first use.
    pub(crate) staging: Mutex<Option<wgpu::Buffer>>,
    /// Kernel parameters of recorded dispatches (see `GpuContext::dispatch`); each encoder
    /// holds it too, to give back the slots it took if it is dropped unsubmitted.
    pub(crate) uniforms: Arc<Mutex<UniformRing>>,
    /// Dispatches recorded before an encoder's contents are submitted without waiting:
    /// `EDGETUNE_FLUSH_EVERY`, else [`FLUSH_EVERY`], read when the device is opened.
    pub(crate) submit_every: u64,
    /// Attention splits its keys into slices (split-key decoding) where the plain kernel would
    /// run fewer workgroups than this: `EDGETUNE_SPLIT_KEYS_BELOW` (0 never splits), else
    /// [`SPLIT_KEYS_BELOW`], read when the device is opened.
    pub(crate) split_keys_below: usize,
    /// See [`GpuOptions::kernel_log`] and [`GpuContext::kernel`].
    kernel_log: Option<std::path::PathBuf>,
}

/// Dispatches recorded before the encoder's contents are submitted without waiting.
pub const FLUSH_EVERY: u64 = 256;

/// Attention over more than one slice of keys is split where the plain kernel's grid of
/// (query, head) workgroups is smaller than this (see `launch::key_splits`).
pub const SPLIT_KEYS_BELOW: usize = 256;

/// One uniform buffer that holds the parameters of many dispatches, one aligned slot each,
/// used round and round. Slots are filled on the CPU as dispatches are recorded and written to
/// the GPU in one copy before the next submission (`GpuContext::submit`), which the queue
/// orders after every earlier submission that read the slot before.
///
/// Several threads may record into encoders of one context at once (two models on one
/// context, say). A slot that an unsubmitted encoder took must not be written again before
/// that encoder is submitted, so each encoder counts the bytes it holds in the current buffer
/// (`generation`), and `outstanding` sums them over all encoders. The ring goes round to 0 only
/// when no other encoder holds slots in it; otherwise, or when one encoder alone has filled
/// it, a new buffer starts a new generation (the old one lives on in the bind groups of the
/// dispatches that read it).
#[derive(Debug)]
pub(crate) struct UniformRing {
    pub(crate) buf: Option<wgpu::Buffer>,
    /// Which buffer this is: a new one for each `buf` made.
    pub(crate) generation: u64,
    /// Next free byte.
    pub(crate) next: u64,
    /// Bytes of slots recorded since the last write, starting at `pending_start`.
    pub(crate) pending: Vec<u8>,
    pub(crate) pending_start: u64,
    /// Bytes of this buffer's slots held by encoders not yet submitted.
    pub(crate) outstanding: u64,
}

impl UniformRing {
    /// Gives back `bytes` of slots of buffer `generation` that an encoder held (it was
    /// submitted, or dropped without being submitted).
    pub(crate) fn release(&mut self, generation: u64, bytes: u64) {
        if generation == self.generation {
            self.outstanding = self.outstanding.saturating_sub(bytes);
        }
    }
}

/// Running totals behind [`GpuContext::counts`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) dispatches: AtomicU64,
    pub(crate) buffers: AtomicU64,
    pub(crate) bind_groups: AtomicU64,
    pub(crate) pipelines: AtomicU64,
    pub(crate) submits: AtomicU64,
    pub(crate) passes: AtomicU64,
    pub(crate) submit_ns: AtomicU64,
    pub(crate) wait_ns: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the time since `start` to `counter`, in nanoseconds.
    fn add_time(counter: &AtomicU64, start: std::time::Instant) {
        counter.fetch_add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// How many dispatches the GPU layer has recorded and how many buffers, bind groups, compute
/// pipelines and queue submissions it has made since the device was opened, and the host's
/// time in submitting and in waiting for the GPU. Differences between two readings count what
/// one training step or one decoded token costs; the wall-clock time of that work less the two
/// times is the host's recording (and whatever else it did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuCounts {
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Buffers created.
    pub buffers: u64,
    /// Bind groups created.
    pub bind_groups: u64,
    /// Compute pipelines compiled.
    pub pipelines: u64,
    /// Queue submissions.
    pub submits: u64,
    /// Compute passes begun outside profiling: a copy between two dispatches ends one.
    pub passes: u64,
    /// Nanoseconds spent in [`GpuContext::submit`] (on every thread): writing the kernel
    /// parameters and handing the command buffers to the queue.
    pub submit_ns: u64,
    /// Nanoseconds spent in [`GpuContext::wait`] (on every thread): the GPU finishing work the
    /// host waits for, and the driver telling it so.
    pub wait_ns: u64,
}

impl std::ops::Sub for GpuCounts {
    type Output = GpuCounts;
    fn sub(self, o: GpuCounts) -> GpuCounts {
        GpuCounts {
            dispatches: self.dispatches - o.dispatches,
            buffers: self.buffers - o.buffers,
            bind_groups: self.bind_groups - o.bind_groups,
            pipelines: self.pipelines - o.pipelines,
            submits: self.submits - o.submits,
            passes: self.passes - o.passes,
            submit_ns: self.submit_ns - o.submit_ns,
            wait_ns: self.wait_ns - o.wait_ns,
        }
    }
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl GpuContext {
    /// Opens the adapter chosen by `opts` (see the module docs) with the kernel families the
    /// table picks, before any self-test (`GpuContext::new`, in gpu/probe.rs, runs those).
    pub(crate) fn open_unprobed(opts: &GpuOptions) -> Result<Self> {
        pollster::block_on(Self::open_async(opts))
    }

    async fn open_async(opts: &GpuOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if std::env::var_os("WGPU_BACKEND").is_none() {
            desc.backends = wgpu::Backends::PRIMARY;
        }
        let instance = wgpu::Instance::new(desc);
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        // Never pick a GL adapter for compute: prefer the native APIs.
        adapters.retain(|a| a.get_info().backend != wgpu::Backend::Gl);
        let seen: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let wanted = opts.adapter.clone().or_else(|| std::env::var("EDGETUNE_ADAPTER").ok()).filter(|s| !s.is_empty());
        let adapter = match &wanted {
            // `#N`: the N-th adapter (from 0) in the order they are listed, for machines with
            // several GPUs of one name.
            Some(w) if w.starts_with('#') => {
                let n: usize = w[1..].trim().parse().map_err(|_| Error::NoAdapter {
                    detail: format!(" for {w:?}: expected #N, the adapter's index from 0 (adapters present: {seen:?})"),
                })?;
                adapters.into_iter().nth(n).ok_or_else(|| Error::NoAdapter {
                    detail: format!(" with index {n} ({} present: {seen:?})", seen.len()),
                })?
            }
            Some(w) => {
                let lw = w.to_lowercase();
                adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&lw)).ok_or_else(|| {
                    Error::NoAdapter {
                        detail: format!(" matching EDGETUNE_ADAPTER={w:?} (adapters present: {seen:?})"),
                    }
                })?
            }
            None => {
                adapters.sort_by_key(|a| rank(a.get_info().device_type));
                adapters.into_iter().next().ok_or_else(|| Error::NoAdapter { detail: String::new() })?
            }
        };
        let info = adapter.get_info();
        let features = adapter.features();
        let mut limits = adapter.limits();
        if let Some(cap) = opts.max_workgroup_storage {
            limits.max_compute_workgroup_storage_size = limits.max_compute_workgroup_storage_size.min(cap);
        }
        if let Some(cap) = opts.max_storage_binding {
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        let mut required = wgpu::Features::empty();
        let no_subgroups = opts.no_subgroups || family::no_subgroups_from_env()?;
        let features = if no_subgroups { features - wgpu::Features::SUBGROUP } else { features };
        for f in [wgpu::Features::SHADER_F16, wgpu::Features::TIMESTAMP_QUERY, wgpu::Features::SUBGROUP] {
            if features.contains(f) {
                required |= f;
            }
        }
        let coop = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let mut facts = AdapterFacts {
            device_type: info.device_type,
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            coop_16x16_f16: features.contains(coop | wgpu::Features::SHADER_F16)
                && adapter.cooperative_matrix_properties().iter().any(|c| {
                    (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                        && c.ab_type == wgpu::CooperativeScalarType::F16
                        && c.cr_type == wgpu::CooperativeScalarType::F32
                }),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            coop_8x8_f32: features.contains(coop)
                && adapter.cooperative_matrix_properties().iter().any(|c| {
                    (c.m_size, c.n_size, c.k_size) == (8, 8, 8)
                        && c.ab_type == wgpu::CooperativeScalarType::F32
                        && c.cr_type == wgpu::CooperativeScalarType::F32
                }),
        };
        // What the emulation provides where the adapter lacks it: 16 x 16 x 16 f16 products (on
        // f16 arithmetic) and 8 x 8 x 8 f32 ones, on groups of 32 threads that need no subgroup
        // operations. An adapter with either configuration keeps its facts and real kernels.
        let coop_emulated = opts.emulate_coop && !facts.coop_16x16_f16 && !facts.coop_8x8_f32;
        if coop_emulated {
            facts.coop_16x16_f16 = features.contains(wgpu::Features::SHADER_F16);
            facts.coop_8x8_f32 = true;
            facts.subgroups = true;
            facts.subgroup_size = (32, 32);
        }
        let forced = match opts.kernels {
            Some(f) => Some(f),
            None => family::from_env()?,
        };
        let (asked, from) = match opts.tile128_min_groups {
            Some(groups) => (Some(groups), "GpuOptions::tile128_min_groups"),
            None => (family::tile128_min_groups_from_env()?, "EDGETUNE_TILE128_MIN_GROUPS"),
        };
        let kernels = family::with_min_groups(family::choose(&facts, forced)?, &facts, asked, from)?;
        let narrow_max = match opts.narrow_max {
            Some(n) => n,
            None => family::narrow_max_from_env()?.unwrap_or(kernels.narrow_max),
        };
        let kernels = family::Kernels { narrow_max, ..kernels };
        let shader_checks = match opts.shader_checks {
            Some(c) => c,
            None => ShaderChecks::from_env()?.unwrap_or(ShaderChecks::Bounds),
        };
        // Cooperative matrices are an experimental wgpu feature: asked for only when a family
        // that uses them is to be tried (and then only used after its self-test).
        let experimental = if kernels.family.uses_matrix_units() && !coop_emulated {
            required |= coop;
            // SAFETY: wgpu asks its callers to acknowledge that experimental features may have
            // bugs. Only the coop16 and coop8 kernels use this one, and only after the start-up self-test
            // (gpu/probe.rs) has checked their results against the CPU twin.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("edgetune"),
                required_features: required,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("could not open device on adapter {}: {e}", info.name)))?;
        let report = AdapterReport {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix: features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            kernels,
            coop_self_test: None,
            coop_emulated,
            facts,
            forced,
            memory: memory::query(&adapter),
            shader_checks,
        };
        // wgpu's default handler panics on validation errors; record them and return them as
        // errors instead, so no panic escapes into an embedding application.
        let uncaptured = std::sync::Arc::new(Mutex::new(None));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));
        let lost = std::sync::Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            // Destroyed is this context being dropped, not a fault.
            if reason != wgpu::DeviceLostReason::Destroyed
                && let Ok(mut slot) = lost_sink.lock()
            {
                slot.get_or_insert_with(|| format!("{message} ({reason:?})"));
            }
        });
        let gpu_timeout = opts.gpu_timeout.unwrap_or_else(|| {
            std::env::var("EDGETUNE_GPU_TIMEOUT_S")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(GPU_TIMEOUT, std::time::Duration::from_secs_f64)
        });
        Ok(GpuContext {
            adapter,
            device,
            queue,
            report,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            uncaptured,
            lost,
            gpu_timeout,
            profile: Mutex::new(None),
            counters: Counters::default(),
            scratch: Mutex::new(None),
            staging: Mutex::new(None),
            uniforms: Arc::new(Mutex::new(UniformRing {
                buf: None,
                generation: 0,
                next: 0,
                pending: Vec::new(),
                pending_start: 0,
                outstanding: 0,
            })),
            submit_every: std::env::var("EDGETUNE_FLUSH_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(FLUSH_EVERY),
            split_keys_below: std::env::var("EDGETUNE_SPLIT_KEYS_BELOW")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(SPLIT_KEYS_BELOW),
            kernel_log: opts
                .kernel_log
                .clone()
                .or_else(|| std::env::var_os("EDGETUNE_KERNEL_LOG").filter(|v| !v.is_empty()).map(Into::into)),
        })
    }

    /// The GPU's memory now, where the backend reports it: unlike [`AdapterReport::memory`],
    /// read when the adapter was opened, the free bytes here count what has been allocated since.
    pub fn memory(&self) -> Option<GpuMemory> {
        memory::query(&self.adapter)
    }

    /// Bytes of GPU memory allocated through the driver allocator for this device, where the backend reports
    /// it (Vulkan and DX12 do).
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.device.generate_allocator_report().map(|r| r.total_allocated_bytes)
    }

    /// Attention splits its keys where the plain kernel's grid is smaller than this many
    /// workgroups (0: never; see [`SPLIT_KEYS_BELOW`]).
    pub fn split_keys_below(&self) -> usize {
        self.split_keys_below
    }

    /// What has been created and recorded so far (see [`GpuCounts`]).
    pub fn counts(&self) -> GpuCounts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GpuCounts {
            dispatches: get(&c.dispatches),
            buffers: get(&c.buffers),
            bind_groups: get(&c.bind_groups),
            pipelines: get(&c.pipelines),
            submits: get(&c.submits),
            passes: get(&c.passes),
            submit_ns: get(&c.submit_ns),
            wait_ns: get(&c.wait_ns),
        }
    }

    /// Submits finished encoders to the queue, counted, after writing the kernel parameters of
    /// the dispatches recorded so far. Every submission of recorded dispatches must come
    /// through here. The parameter slots the encoders held are given back only once the queue
    /// has them, under the ring's lock, so no other thread can write over a slot in between.
    pub fn submit(&self, cmds: impl IntoIterator<Item = Commands>) -> wgpu::SubmissionIndex {
        let start = std::time::Instant::now();
        Counters::add(&self.counters.submits);
        let mut cmds: Vec<Commands> = cmds.into_iter().collect();
        let buffers: Vec<wgpu::CommandBuffer> = cmds.iter_mut().filter_map(|c| c.buffer.take()).collect();
        let mut ring = self.uniforms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.write_uniforms(&mut ring);
        let index = self.queue.submit(buffers);
        for c in &mut cmds {
            ring.release(c.hold.generation, std::mem::take(&mut c.hold.bytes));
        }
        Counters::add_time(&self.counters.submit_ns, start);
        index
    }

    /// Copies the pending parameter slots to the GPU (before the next submission).
    pub(crate) fn write_uniforms(&self, ring: &mut UniformRing) {
        if let Some(buf) = &ring.buf
            && !ring.pending.is_empty()
        {
            self.queue.write_buffer(buf, ring.pending_start, &ring.pending);
        }
        ring.pending.clear();
        ring.pending_start = ring.next;
    }

    /// Runs `make`, which creates GPU buffers, and turns the driver running out of memory
    /// meanwhile into [`Error::OutOfMemory`] naming `what`, the `planned_bytes` and what to
    /// change. (wgpu reports a failed allocation as an error, not through the `create_*` call;
    /// unscoped, it would surface at the next [`GpuContext::check`] without the plan.)
    pub fn allocating<T>(
        &self,
        what: &str,
        planned_bytes: u64,
        advice: &str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let made = make();
        match pollster::block_on(scope.pop()) {
            Some(e) => {
                let memory = match self.report.memory {
                    Some(m) => format!("the GPU reports {} MiB", m.total_bytes >> 20),
                    None => "the GPU reports no size".to_string(),
                };
                Err(Error::OutOfMemory {
                    what: what.to_string(),
                    planned_bytes,
                    detail: format!("the driver says \"{e}\" ({memory}); {advice}"),
                })
            }
            None => made,
        }
    }

    /// Returns (and clears) the first GPU error reported since the last check, or that the
    /// device was lost (which stays).
    pub fn check(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().ok().and_then(|s| s.clone()) {
            return Err(Error::Gpu(format!("the GPU device was lost: {why}")));
        }
        match self.uncaptured.lock().ok().and_then(|mut s| s.take()) {
            Some(e) => Err(Error::Gpu(e)),
            None => Ok(()),
        }
    }

    /// Waits for `submission` (or everything submitted), at most [`GpuOptions::gpu_timeout`]:
    /// a GPU that stops answering, or a lost device, is an error rather than a hang.
    pub fn wait(&self, submission: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let timeout = Some(self.gpu_timeout);
        let start = std::time::Instant::now();
        let polled = self.device.poll(wgpu::PollType::Wait { submission_index: submission, timeout });
        Counters::add_time(&self.counters.wait_ns, start);
        match polled {
            Ok(_) => self.check(),
            Err(wgpu::PollError::Timeout) => {
                self.check()?;
                Err(Error::Gpu(format!(
                    "the GPU did not finish its work within {:.3} s (GpuOptions::gpu_timeout, or \
                     EDGETUNE_GPU_TIMEOUT_S): it has stopped answering, or this work is far too large for it",
                    self.gpu_timeout.as_secs_f64()
                )))
            }
            Err(e) => {
                self.check()?;
                Err(Error::Gpu(format!("waiting for the GPU: {e}")))
            }
        }
    }

    /// The compute pipeline for a shader, compiled on first use and cached, with the values of
    /// the pipeline constants it is made with: those the shader declares without a default
    /// (the quantized kernels' block size, `("BLOCK_SIZE", 64)`) and any of those with one
    /// (`("ROWS_LORA", 1)`: the many-row forward kernels summing each row's own adapter).
    /// Compilation errors are caught through an error scope and returned, never panicked on; a
    /// constant the shader does not declare, or one it declares without a default and is not
    /// given, is an error naming both.
    pub fn pipeline(&self, shader: &Shader, constants: &[(&'static str, u32)]) -> Result<wgpu::ComputePipeline> {
        Ok(self.kernel(shader, constants, false)?.pipeline)
    }

    /// A shader's pipeline (for `constants`, see [`GpuContext::pipeline`]) and bind-group
    /// layout, made on first use and cached. The module and layout are made once a shader and
    /// shared by its pipelines for each set of constants. The layout is written out from the
    /// shader's declarations (see [`Shader::bindings`]) rather than derived by wgpu, because the
    /// params binding takes a dynamic offset.
    ///
    /// `dispatching`: the kernel is wanted for a dispatch (not only compiled); where the context
    /// keeps a kernel log ([`GpuOptions::kernel_log`]), the first such call for a shader appends
    /// the name of the kernel that runs (a cooperative-matrix kernel's emulated twin where the
    /// context emulates them) to it, one line.
    pub(crate) fn kernel(
        &self,
        shader: &Shader,
        constants: &[(&'static str, u32)],
        dispatching: bool,
    ) -> Result<Kernel> {
        let mut cache = self.pipelines.lock().map_err(|_| Error::Gpu("pipeline cache poisoned".into()))?;
        let asked = shader.name;
        let compiled = match cache.entry(asked) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.compile(shader)?),
        };
        if let Some(path) = self.kernel_log.as_ref().filter(|_| dispatching && !compiled.dispatched) {
            append_line(path, compiled.runs)
                .map_err(|e| Error::Gpu(format!("EDGETUNE_KERNEL_LOG: cannot append to {}: {e}", path.display())))?;
            compiled.dispatched = true;
        }
        if let Some((_, pipeline)) = compiled.pipelines.iter().find(|(c, _)| c == constants) {
            return Ok(Kernel { pipeline: pipeline.clone(), layout: compiled.layout.clone() });
        }
        let declared = |name: &str| compiled.overrides.iter().any(|(n, _)| n == name);
        let given = |name: &str| constants.iter().any(|(n, _)| *n == name);
        let missing = compiled.overrides.iter().any(|(n, optional)| !optional && !given(n));
        if missing || constants.iter().any(|(n, _)| !declared(n)) {
            let names = |optional: bool| -> Vec<&str> {
                compiled.overrides.iter().filter(|o| o.1 == optional).map(|o| o.0.as_str()).collect()
            };
            let given: Vec<&str> = constants.iter().map(|c| c.0).collect();
            return Err(Error::Gpu(format!(
                "shader {asked} declares the pipeline constants {:?} (and the optional {:?}) and was given {given:?}",
                names(false),
                names(true)
            )));
        }
        let values: Vec<(&str, f64)> = constants.iter().map(|&(name, v)| (name, f64::from(v))).collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(asked),
            layout: Some(&compiled.pipeline_layout),
            module: &compiled.module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &values, ..Default::default() },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("shader {asked} failed to compile: {err}")));
        }
        Counters::add(&self.counters.pipelines);
        compiled.pipelines.push((constants.to_vec(), pipeline.clone()));
        Ok(Kernel { pipeline, layout: compiled.layout.clone() })
    }

    /// A shader's module and layouts, and the names of the pipeline constants it declares.
    fn compile(&self, shader: &Shader) -> Result<Compiled> {
        let shader = if self.report.coop_emulated && shader.uses_cooperative_matrix() {
            super::shaders::emulated_twin(shader)?
        } else {
            shader
        };
        let source = expand(shader)?;
        // wgpu does not check this limit, and a driver may fail without a word (see
        // gpu/workgroup.rs); the family table keeps the kernels it picks inside it.
        let (bytes, limit) =
            (super::workgroup_bytes(shader.name, &source)?, self.limits.max_compute_workgroup_storage_size);
        if bytes > limit {
            return Err(Error::Gpu(format!(
                "shader {} uses {bytes} bytes of workgroup memory and this device allows {limit} \
                 (max_compute_workgroup_storage_size)",
                shader.name
            )));
        }
        let overrides = overrides_in(&source).into_iter().map(|o| (o.name.to_owned(), o.optional)).collect();
        let entries: Vec<wgpu::BindGroupLayoutEntry> = shader
            .bindings_in(&source)?
            .into_iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Binding::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: None,
                    },
                    Binding::Storage { read_only } => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(shader.name), entries: &entries });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(shader.name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let descriptor =
            wgpu::ShaderModuleDescriptor { label: Some(shader.name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // SAFETY: the kernels are this crate's own, and keep what dropping a check requires of
        // them (see ShaderChecks): every loop ends (held by a test), and with `None`, which is
        // asked for by name, indices stay in bounds and no divisor is zero.
        let module =
            unsafe { self.device.create_shader_module_trusted(descriptor, self.report.shader_checks.runtime_checks()) };
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("shader {} failed to compile: {err}", shader.name)));
        }
        Ok(Compiled {
            module,
            layout,
            pipeline_layout,
            overrides,
            pipelines: Vec::new(),
            runs: shader.name,
            dispatched: false,
        })
    }
}

/// Appends `line` and a newline to the file at `path` (made if missing) in one write: to a file
/// opened for appending, the operating system adds a short write whole, so lines from several
/// processes do not interleave.
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(format!("{line}\n").as_bytes())
}

/// A shader as the pipeline cache holds it: its module and layouts, the pipeline constants it
/// declares, and a pipeline for each value of them asked for so far.
#[derive(Debug)]
struct Compiled {
    module: wgpu::ShaderModule,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    /// Each pipeline constant's name, and whether it has a default.
    overrides: Vec<(String, bool)>,
    pipelines: Vec<(Vec<(&'static str, u32)>, wgpu::ComputePipeline)>,
    /// The name of the shader compiled: the one asked for, or its emulated twin.
    runs: &'static str,
    /// Whether it has been dispatched (and logged, see [`GpuContext::kernel`]).
    dispatched: bool,
}

/// A compiled shader: its pipeline and the layout of its one bind group.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
}
