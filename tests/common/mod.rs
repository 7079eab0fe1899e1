//! Helpers shared by the integration tests: fixture loading and `assert_close`.
#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// The repository's `tests/reference/fixtures` folder: `EDGETUNE_FIXTURES` when set, for test
/// binaries built in one checkout and run in another (`scripts/gpu-tests.sh`), else this
/// checkout's.
pub fn fixtures() -> PathBuf {
    std::env::var_os("EDGETUNE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures"))
}

/// Copies the files of the folder `src` into `dst` (created if missing): a fixture folder to
/// change a file of.
pub fn copy_files(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("folder");
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
}

/// A fixture safetensors file, loaded whole.
pub struct Fixture {
    bytes: Vec<u8>,
    pub name: String,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { bytes, name: name.into() }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture is valid safetensors")
    }
    pub fn metadata(&self, key: &str) -> String {
        let (_, m) = SafeTensors::read_metadata(&self.bytes).expect("fixture header");
        m.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("{}: no metadata {key}", self.name))
    }
    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.st().tensor(key).unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name)).shape().to_vec()
    }
    pub fn u8(&self, key: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name));
        assert_eq!(t.dtype(), Dtype::U8, "{key}");
        t.data().to_vec()
    }
    pub fn f32(&self, key: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name));
        assert_eq!(t.dtype(), Dtype::F32, "{key}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    pub fn i64(&self, key: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name));
        assert_eq!(t.dtype(), Dtype::I64, "{key}");
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    }
}

/// Asserts |a - e| <= abs + rel * |e| elementwise; on failure prints the max abs/rel diff and the
/// first mismatching indices.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], rel: f32, abs: f32) {
    assert_close_slack(what, actual, expected, rel, abs, &[]);
}

/// The arithmetic of a context's many-row products through frozen weights (forward, and input
/// gradients through f16 and NF4 weights).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    /// f32 operands and sums.
    F32,
    /// f16 operands, products exact in f32 and summed in f32: the coop16 family.
    F16Operands,
    /// f16 operands, products rounded to f16 and summed in f16 over runs of `HALF_RUN` steps,
    /// the runs' sums in f32: the half family (shaders/common/tile128_half.wgsl).
    F16Runs,
}

impl Arith {
    /// Whether the operands are rounded to f16.
    #[allow(dead_code)]
    pub fn f16(self) -> bool {
        self != Arith::F32
    }

    /// What one product through frozen weights may add to an output's error, as a share of its
    /// mass sum |a b| (to first order; [`f16_slack`] derives it): 0 in f32.
    #[allow(dead_code)]
    pub fn per_product(self) -> f32 {
        let u = 2f32.powi(-11);
        match self {
            Arith::F32 => 0.0,
            Arith::F16Operands => 2.0 * u,
            Arith::F16Runs => (HALF_RUN + 2) as f32 * u,
        }
    }
}

/// The steps of the reduction whose products the half family sums in f16 before adding them
/// up in f32 (`HALF_RUN` in shaders/common/tile128_half.wgsl).
pub const HALF_RUN: usize = 8;

/// The arithmetic of `ctx`'s products through frozen weights ([`Arith`]).
#[allow(dead_code)]
pub fn f16_products(ctx: &edgetune::gpu::GpuContext) -> Arith {
    match ctx.report.kernels.family {
        edgetune::gpu::KernelFamily::Coop16 => Arith::F16Operands,
        edgetune::gpu::KernelFamily::Half => Arith::F16Runs,
        _ => Arith::F32,
    }
}

/// For a product out[r, c] = scale * sum_j a(r, j) b(c, j) (rows x cols, row-major, j < red)
/// that ran with f16 arithmetic (`arith`), how far each output may lie from the exact sum, on top
/// of the f32 tolerance. Empty for f32.
///
/// - f16 operands, f32 sums (coop16): each operand rounded to f16 (u = 2^-11, so 2u + u^2 of
///   sum_j |a b|), f32 sums in two orders (2 red 2^-24 of it), and f16's subnormals, which lose
///   up to 2^-25 of b and of a once its row is scaled to a largest magnitude of 2^14 or more (so
///   2^-25 sum_j |a| + 2^-39 max_j |a| sum_j |b|).
/// - f16 runs (half): the operands rounded (2u + u^2), each product rounded to f16 and a run of
///   n = `HALF_RUN` summed in f16 (each product once, each of the n - 1 partial sums, which are
///   at most the run's mass, once: n u of the run's mass, and to second order (n + 2)^2 u^2
///   with the operands'), the runs' and slices' sums in f32 (2 red 2^-24); and f16's range floor:
///   a's row is scaled by 2^e into [2^2, 2^3) (e = 3 - the exponent of its largest magnitude, in
///   [0.5, 1) form; the whole row's, which is at most a slice's) and b by 2^8, and a scaled
///   operand, product or partial sum below 2^-14 may lose up to 2^-14 (flushed to zero), so per
///   step 2^-14 (|b| 2^8 + |a| 2^e + 2) in scaled units: 2^-(14 + e) sum_j |b| + 2^-22
///   sum_j |a| + red 2^-(21 + e) once the scales are divided out. A step with |b| >= 2 is summed
///   in f32 instead, within the same bound.
#[allow(dead_code)]
pub fn f16_slack(
    arith: Arith,
    (rows, cols, red): (usize, usize, usize),
    scale: f32,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    if arith == Arith::F32 {
        return vec![];
    }
    let u = 2f64.powi(-11);
    let f32_sums = 2.0 * red as f64 * 2f64.powi(-24);
    let run = (HALF_RUN + 2) as f64;
    let per_mass = match arith {
        Arith::F16Runs => run * u + run * run * u * u + f32_sums,
        _ => 2.0 * u + u * u + f32_sums,
    };
    let b_sums: Vec<f64> = (0..cols).map(|c| (0..red).map(|j| f64::from(b(c, j).abs())).sum()).collect();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row: Vec<f64> = (0..red).map(|j| f64::from(a(r, j).abs())).collect();
        let (sum_a, top_a) = (row.iter().sum::<f64>(), row.iter().fold(0f64, |t, &v| t.max(v)));
        // The exponent of half's row scale (as the kernel's half_scale_exp).
        let e = if top_a > 0.0 { (3 - (top_a.log2().floor() as i32 + 1)).clamp(-126, 126) } else { 0 };
        for (c, &sum_b) in b_sums.iter().enumerate() {
            let mass: f64 = row.iter().enumerate().map(|(j, &v)| v * f64::from(b(c, j).abs())).sum();
            let floor = match arith {
                Arith::F16Runs => 2f64.powi(-14 - e) * sum_b + 2f64.powi(-22) * sum_a + red as f64 * 2f64.powi(-21 - e),
                _ => 2f64.powi(-25) * sum_a + 2f64.powi(-39) * top_a * sum_b,
            };
            out.push((f64::from(scale.abs()) * (per_mass * mass + floor)) as f32);
        }
    }
    out
}

/// [`assert_close`] with `slack[i]` more allowed on element i (none where `slack` is empty).
pub fn assert_close_slack(what: &str, actual: &[f32], expected: &[f32], rel: f32, abs: f32, slack: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    assert!(slack.is_empty() || slack.len() == actual.len(), "{what}: slack length differs");
    let mut max_abs = 0f32;
    let mut max_rel = 0f32;
    let mut bad = Vec::new();
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let d = (a - e).abs();
        max_abs = max_abs.max(d);
        if e != 0.0 {
            max_rel = max_rel.max(d / e.abs());
        }
        // Written so that a NaN difference counts as a mismatch.
        let within = d <= abs + rel * e.abs() + slack.get(i).copied().unwrap_or(0.0);
        if !within {
            bad.push((i, a, e));
        }
    }
    if !bad.is_empty() {
        let first: Vec<String> = bad.iter().take(5).map(|(i, a, e)| format!("[{i}] got {a} want {e}")).collect();
        panic!(
            "{what}: {} of {} values differ (rel {rel}, abs {abs}); max abs diff {max_abs:e}, max rel diff {max_rel:e}; first: {}",
            bad.len(),
            actual.len(),
            first.join(", ")
        );
    }
    eprintln!("{what}: max abs diff {max_abs:e}, max rel diff {max_rel:e} over {} values", actual.len());
}

/// The GPU context for a test. A missing adapter fails the test: it is never a silent skip.
/// In a run of [`rerun_with_subgroups_of`], the adapter must have subgroups of the size asked for.
pub fn gpu() -> edgetune::gpu::GpuContext {
    let ctx = edgetune::gpu::GpuContext::new(&edgetune::gpu::GpuOptions::default())
        .unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"));
    if let Ok(lanes) = std::env::var(SUBGROUP_LANES) {
        let lanes: u32 = lanes.parse().expect("a number of lanes");
        assert_eq!(ctx.report.subgroup_size, (lanes, lanes), "{SUBGROUP_LANES}: the adapter's subgroup size");
    }
    ctx
}

/// Set by [`rerun_with_subgroups_of`] in the run it starts: the subgroup size its adapter must have.
const SUBGROUP_LANES: &str = "EDGETUNE_TEST_SUBGROUP_LANES";

/// The subgroup sizes other than its default of 8 that lavapipe can be given on this CPU, for
/// [`rerun_with_subgroups_of`]: 4 (128-bit vectors, any CPU) and, with AVX-512, 16. Empty (and
/// said) on another adapter, whose own size the tests run.
pub fn other_subgroup_sizes(ctx: &edgetune::gpu::GpuContext) -> Vec<u32> {
    if !ctx.report.name.starts_with("llvmpipe") {
        eprintln!("{} runs the tests at its own subgroup size; other sizes are set on lavapipe only", ctx.report.name);
        return vec![];
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return vec![4, 16];
    }
    eprintln!("subgroups of 16 lanes need AVX-512, which this CPU lacks: 4 lanes only");
    vec![4]
}

/// Runs this test binary's test `name` again in a child process whose lavapipe has subgroups
/// of `lanes` lanes (`LP_NATIVE_VECTOR_WIDTH`, 32 bits a lane, which Mesa reads once, at
/// start-up), where the default context must report that size ([`gpu`]). Fails, with the
/// child's output, unless that one test ran and passed. Mesa's shader cache does not key its
/// entries by the vector width: with the usual cache the child would run kernels compiled for
/// 8 lanes (and leave ones compiled for its width to other processes), so it keeps a cache of
/// its own for each width.
pub fn rerun_with_subgroups_of(name: &str, lanes: u32) {
    let exe = std::env::current_exe().expect("the test binary");
    let home_cache = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or(home_cache).unwrap_or_else(std::env::temp_dir);
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture"])
        .env("LP_NATIVE_VECTOR_WIDTH", (32 * lanes).to_string())
        .env("MESA_SHADER_CACHE_DIR", cache.join(format!("edgetune/mesa-shader-cache-{lanes}-lanes")))
        .env(SUBGROUP_LANES, lanes.to_string())
        .output()
        .expect("run the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ran = text.contains("test result: ok. 1 passed");
    assert!(out.status.success() && ran, "{name} with subgroups of {lanes} lanes:\n{text}");
    eprintln!("{name}: passed with subgroups of {lanes} lanes");
}

/// A context for every kernel family the adapter can run (see [`fresh_gpus`]), opened once for
/// the test binary and shared by its tests, as an app shares one context between its threads:
/// each family's start-up self-test runs once and each kernel is compiled once in each family,
/// where a binary's tests would otherwise repeat both. The tests run in parallel threads, so
/// two of them may record on one context at once (which the contexts support: README,
/// *Reliability*); a test that reads a context's counters or profiles it, which see every
/// thread's work, takes [`fresh_gpus`] instead.
pub fn gpus() -> Vec<std::sync::Arc<edgetune::gpu::GpuContext>> {
    static SHARED: std::sync::OnceLock<Vec<std::sync::Arc<edgetune::gpu::GpuContext>>> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| fresh_gpus().into_iter().map(std::sync::Arc::new).collect()).clone()
}

/// tile128 on a device opened with 16 KiB of workgroup memory (Vulkan's minimum, WebGPU's
/// default), shared by the test binary: what an adapter with that little gets, every product on
/// tile64's 64 x 64 blocks and attention on portable's kernels. Each kernel the context compiles
/// is measured against that limit and refused past it (`edgetune::gpu::workgroup`), so a test
/// that runs on it fails if that family dispatches a kernel that needs more.
pub fn small_workgroup_gpu() -> std::sync::Arc<edgetune::gpu::GpuContext> {
    use edgetune::gpu::family::{PORTABLE_WORKGROUP_BYTES, TILE64_ONLY};
    use edgetune::gpu::{GpuContext, GpuOptions, KernelFamily};
    static SHARED: std::sync::OnceLock<std::sync::Arc<GpuContext>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let opts = GpuOptions {
                kernels: Some(KernelFamily::Tile128),
                max_workgroup_storage: Some(PORTABLE_WORKGROUP_BYTES),
                ..Default::default()
            };
            let ctx = GpuContext::new(&opts).unwrap_or_else(|e| panic!("tile128 in 16 KiB: {e}"));
            assert_eq!(ctx.report.max_compute_workgroup_storage_size, PORTABLE_WORKGROUP_BYTES);
            let k = ctx.report.kernels;
            assert_eq!((k.tile128_min_groups, k.attention), (TILE64_ONLY, KernelFamily::Portable), "{k}");
            std::sync::Arc::new(ctx)
        })
        .clone()
}

/// A new context for every kernel family the adapter can run (see `edgetune::gpu::family`):
/// the default one first, then each other family forced, so tests on lavapipe cover `simd8`,
/// `portable` and `tile128` (on 128 x 128 tiles and, in a context of its own, on 64 x 64 ones,
/// tile64, with LoRA's narrow products on the narrow blocks), and `coop16` and `coop8` with
/// their matrix operations emulated.
pub fn fresh_gpus() -> Vec<edgetune::gpu::GpuContext> {
    use edgetune::gpu::{GpuContext, GpuOptions, KernelFamily};
    let default = gpu();
    let mut all = vec![];
    for family in KernelFamily::ALL {
        if family == default.report.kernels.family {
            continue;
        }
        // tile128's kernels on every product, however small its grid, so that the tests'
        // shapes reach them (by default small grids run on 64 x 64 blocks, tile64).
        let opts = GpuOptions { kernels: Some(family), tile128_min_groups: Some(0), ..Default::default() };
        // Where tile128 is the family, narrow products too (by default they run on 256 x 16
        // blocks).
        let opts = match family {
            KernelFamily::Tile128 => GpuOptions { narrow_max: Some(0), ..opts },
            _ => opts,
        };
        match GpuContext::new(&opts) {
            Ok(ctx) => {
                assert_eq!(ctx.report.kernels.family, family, "a forced family was ignored");
                all.push(ctx);
                if family == KernelFamily::Tile128 {
                    // And tile64 on every product, however large its grid, but the narrow ones,
                    // which run on the narrow blocks.
                    let opts = GpuOptions { tile128_min_groups: Some(u32::MAX), narrow_max: None, ..opts };
                    all.push(GpuContext::new(&opts).unwrap_or_else(|e| panic!("tile128 on 64 x 64 blocks: {e}")));
                }
            }
            // Only a family the adapter cannot run may be missing, and it says so.
            Err(e) => assert!(e.to_string().contains("needs"), "{family}: {e}"),
        }
    }
    // Without matrix units, the cooperative-matrix kernels still run with their matrix
    // operations emulated: everything else of them is tested here too (coop16's emulation needs
    // f16 arithmetic, coop8's nothing).
    if !default.report.cooperative_matrix {
        let families = if default.report.shader_f16 {
            &[KernelFamily::Coop16, KernelFamily::Coop8][..]
        } else {
            &[KernelFamily::Coop8]
        };
        for &family in families {
            let opts = GpuOptions {
                kernels: Some(family),
                emulate_coop: true,
                tile128_min_groups: Some(0),
                ..Default::default()
            };
            let ctx = GpuContext::new(&opts).unwrap_or_else(|e| panic!("{family}, emulated: {e}"));
            assert!(ctx.report.coop_emulated, "{family} not emulated");
            let said = ctx.report.coop_self_test.clone().unwrap_or_default();
            assert!(
                said.starts_with(&format!("{family} passed")),
                "the self-test of the emulated {family} kernels: {said}"
            );
            eprintln!("{family}, emulated: self-test {said}");
            all.push(ctx);
        }
    }
    all.insert(0, default);
    all
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Records commands with `f` and submits them; returns how many dispatches `f` recorded.
pub fn run(
    ctx: &edgetune::gpu::GpuContext,
    f: impl FnOnce(&mut edgetune::gpu::Encoder) -> edgetune::Result<()>,
) -> u64 {
    let mut enc = ctx.encoder();
    f(&mut enc).expect("dispatch");
    let recorded = enc.recorded();
    ctx.submit([enc.finish()]);
    recorded
}

/// Random Q4_1 blocks (each block's f16 scale and minimum, 16 bytes of codes) for `n` values.
pub fn q4_1_blocks(n: usize, seed: u64) -> Vec<u8> {
    let noise = rand(n / 32 * 18, seed, 1.0);
    let mut out = Vec::with_capacity(n / 32 * 20);
    for (b, r) in noise.chunks(18).enumerate() {
        let d = half::f16::from_f32(0.01 + 0.02 * r[0].abs());
        let m = half::f16::from_f32(-0.15 * (1.0 + r[1]) + 0.001 * b as f32);
        out.extend(d.to_le_bytes());
        out.extend(m.to_le_bytes());
        out.extend(r[2..18].iter().map(|v| ((v + 1.0) * 127.99) as u8));
    }
    out
}

/// `n` values of a ggml type held as two 4-bit planes (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K), of
/// magnitude up to about `scale`: Q8_0 as ggml quantizes random values; the others as random
/// codes (every bit pattern, 5- and 6-bit scales included) under f16 scales sized so.
pub fn planes_blocks(ty: edgetune::quant::gguf_blocks::GgmlType, n: usize, seed: u64, scale: f32) -> Vec<u8> {
    use edgetune::quant::gguf_blocks::{self, GgmlType};
    if ty == GgmlType::Q8_0 {
        return gguf_blocks::quantize(ty, &rand(n, seed, scale)).expect("quantize");
    }
    let (per, size) = ty.block();
    // Where each block's f16 scales go, and the largest |code · scale| the code bits make.
    let (f16_at, reach): (&[usize], f32) = match ty {
        GgmlType::Q5_0 => (&[0], 16.0),
        GgmlType::Q5_1 => (&[0, 2], 31.0),
        GgmlType::Q5K => (&[0, 2], 63.0 * 31.0),
        GgmlType::Q6K => (&[208], 128.0 * 32.0),
        other => panic!("{} is not held as planes", other.name()),
    };
    let noise = rand(n / per * size, seed, 1.0);
    let mut out: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
    for (b, block) in out.chunks_exact_mut(size).enumerate() {
        for (i, &at) in f16_at.iter().enumerate() {
            let r = noise[b * size + at];
            // The scale positive; a Q5_1 minimum negative, as quantizers write them; a K-quant's
            // dmin positive (its minimums are subtracted), at a 63rd of the reach.
            let v = match (ty, i) {
                (GgmlType::Q5_1, 1) => -scale * (0.5 + 0.5 * r.abs()),
                (GgmlType::Q5K, 1) => scale / 63.0 * (0.5 + 0.5 * r.abs()),
                _ => scale / reach * (0.5 + 0.5 * r.abs()),
            };
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

/// [`planes_blocks`] repacked as the GPU holds them, with the f16 product bound's weight for
/// each value: |hi| + |lo|, since coop16 rounds each plane's values on its own.
pub struct PlanesOnGpu {
    pub block: usize,
    bufs: [wgpu::Buffer; 4],
    pub mass: Vec<f32>,
}

impl PlanesOnGpu {
    pub fn new(
        ctx: &edgetune::gpu::GpuContext,
        ty: edgetune::quant::gguf_blocks::GgmlType,
        blocks: &[u8],
        n: usize,
    ) -> Self {
        let p = edgetune::quant::gguf_blocks::planes_repacked(ty, blocks, n).expect("repack");
        let value = |(packed, coeffs): &(Vec<u8>, Vec<f32>), e: usize| {
            let q = if e.is_multiple_of(2) { packed[e / 2] >> 4 } else { packed[e / 2] & 0xF };
            f32::from(q) * coeffs[2 * (e / p.block)] + coeffs[2 * (e / p.block) + 1]
        };
        let mass = (0..n).map(|e| value(&p.hi, e).abs() + value(&p.lo, e).abs()).collect();
        let bufs = [
            ctx.storage_from("hi", &p.hi.0),
            ctx.storage_from("hi", &p.hi.1),
            ctx.storage_from("lo", &p.lo.0),
            ctx.storage_from("lo", &p.lo.1),
        ];
        PlanesOnGpu { block: p.block, bufs, mass }
    }

    pub fn weight(&self) -> edgetune::gpu::launch::Weight<'_> {
        use edgetune::gpu::launch::{Q4Plane, Weight};
        let [hp, hc, lp, lc] = &self.bufs;
        Weight::Planes {
            hi: Q4Plane { packed: hp, coeffs: hc },
            lo: Q4Plane { packed: lp, coeffs: lc },
            block_size: self.block,
        }
    }
}

/// An adapter of rank 4 on every linear module, its B moved off zero so that every gradient is
/// non-trivial (the same values for the same model shape).
pub fn moved_adapter(cfg: &edgetune::model::config::ModelConfig) -> edgetune::lora::Adapter {
    let lora = edgetune::lora::LoraConfig { r: 4, ..Default::default() };
    let mut adapter = edgetune::lora::Adapter::new(cfg, lora).expect("adapter");
    adapter.params.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0));
    adapter
}

/// The LoRA gradients of one forward and backward pass of `model` with `adapter` over `ids`,
/// every token trained.
pub fn lora_grads(model: &edgetune::model::llama::Model, adapter: &edgetune::lora::Adapter, ids: &[u32]) -> Vec<f32> {
    use edgetune::model::training::{Batch, WorkspacePlan};
    let train = vec![true; ids.len()];
    let batch = Batch::pack([(ids, &train[..])]).expect("pack");
    let gpu = edgetune::lora::GpuAdapter::upload(&model.ctx, adapter);
    let ws = model.workspace(WorkspacePlan::new(batch.len(), adapter.layout.r)).expect("workspace");
    let grads = model.ctx.storage_zeroed("grads", adapter.layout.len);
    let mut enc = model.ctx.encoder();
    model.forward_backward(&mut enc, &ws, &batch, &gpu, &grads, 1.0 / batch.n_scored() as f32).expect("step");
    model.ctx.submit([enc.finish()]);
    model.ctx.read_f32(&grads, adapter.layout.len).expect("grads")
}

/// A GGUF base (`path`) held three ways (f32, its own blocks kept, NF4): the kept blocks give
/// the f32 path's logits and one LoRA step's gradients (the values are ggml's own, so only
/// summation order differs: 1e-4, as in the f32 parity tests), where NF4's re-quantization
/// moves the logits over ten times further. The NF4 model re-quantizes the blocks a chunk at a
/// time; its logits are, bit for bit, those of NF4 made from the same values through the float
/// path ([`nf4_of_values`]), since both must hold the same NF4 bytes and the kernels are the same.
pub fn assert_kept_blocks_compute_as_f32(
    what: &str,
    path: &std::path::Path,
    [exact, kept, nf4]: [&edgetune::model::llama::Model; 3],
    ids: &[u32],
) {
    // The fingerprint (what a checkpoint is resumed against) is the model's, not its holding's:
    // the kept blocks sampled as the f32 values they dequantize to.
    for (how, m) in [("kept", kept), ("nf4", nf4)] {
        assert_eq!(m.fingerprint, exact.fingerprint, "{what}: the {how} model's fingerprint");
    }
    let want = exact.all_logits(ids).expect("f32");
    let got = kept.all_logits(ids).expect("gguf");
    assert_close(&format!("{what}: logits"), &got, &want, 1e-4, 1e-4);
    let requantized = nf4.all_logits(ids).expect("nf4");
    let d = |a: &[f32]| a.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("{what}: {:.2e} from the exact logits, NF4 {:.2e}", d(&got), d(&requantized));
    assert!(d(&requantized) > 10.0 * d(&got), "{what}: re-quantizing should cost more than summation order");
    let from_values = nf4_of_values(exact.ctx.clone(), path).all_logits(ids).expect("nf4 of the values");
    let differ = requantized.iter().zip(&from_values).position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = differ {
        panic!(
            "{what}: NF4 re-quantized from the blocks gives logit {i} = {}, NF4 of the same values as floats {}",
            requantized[i], from_values[i]
        );
    }
    let adapter = moved_adapter(&exact.config);
    let (g_exact, g_kept) = (lora_grads(exact, &adapter, ids), lora_grads(kept, &adapter, ids));
    let scale = g_exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    assert_close(&format!("{what}: gradients"), &g_kept, &g_exact, 1e-4, 1e-4 * scale);
}

/// NF4 made from a GGUF's values through the float path: the file dequantized to F32 beside it
/// ([`reencoded_gguf`]), then loaded as NF4 from those floats with f32 tables, as the tests
/// above load theirs.
pub fn nf4_of_values(
    ctx: std::sync::Arc<edgetune::gpu::GpuContext>,
    path: &std::path::Path,
) -> edgetune::model::llama::Model {
    use edgetune::model::llama::{LoadOptions, Quant};
    let floats = path.with_extension("f32.gguf");
    reencoded_gguf(path, &floats, edgetune::quant::gguf_blocks::GgmlType::F32);
    let opts = LoadOptions { quant: Quant::Nf4, f16_tables: false, ..Default::default() };
    let model = edgetune::model::llama::Model::open(ctx, &floats, &opts).expect("load the F32 file as NF4");
    let _ = std::fs::remove_file(&floats);
    model
}

/// `source`'s tensors written again as `ty` to `out`, metadata and all: `merge_gguf` with an
/// adapter of zeros, which adds nothing to any weight.
pub fn reencoded_gguf(
    source: &std::path::Path,
    out: &std::path::Path,
    ty: edgetune::quant::gguf_blocks::GgmlType,
) -> edgetune::lora::merge::MergedGguf {
    let (cfg, _) = edgetune::model::open_weights(source).expect("config");
    let mut zero = edgetune::lora::Adapter::new(&cfg, edgetune::lora::LoraConfig::default()).expect("adapter");
    zero.params.iter_mut().for_each(|v| *v = 0.0);
    edgetune::lora::merge::merge_gguf(source, &zero, out, ty).expect("re-encode")
}
