//! Small deterministic helpers that several layers share (the data loader, the model, the
//! trainer, decoding, the GPU launchers), so that none of them imports another sideways or
//! upward for them, and production code never leans on the tests' oracle (`reference/`, which
//! keeps its own independent copies to check these against): FNV-1a, a PCG generator, the
//! lowbias32 hash and dropout threshold, the RoPE table, AdamW's bias corrections, greedy
//! argmax, and the runs that spread work over the CPU's cores when a model loads. This module
//! imports nothing from the crate.

/// FNV-1a's 64-bit offset basis: the starting value of [`fnv1a`]. FNV-1a is the hash behind
/// the model, plan and dropout-mask fingerprints: small, stable across platforms and versions.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Feeds `bytes` into a 64-bit FNV-1a hash.
pub(crate) fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
}

/// A small deterministic RNG (PCG-XSH-RR), so a seed gives the same text, initialization and
/// data order on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator's whole state, to save in a checkpoint.
    pub fn state(&self) -> u64 {
        self.0
    }
    /// A generator continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }
    /// A generator seeded with `seed` (the same seed, the same numbers, on every platform).
    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed.wrapping_add(0x853c_49e6_748f_ea9b));
        r.next_u32();
        r
    }
    /// The next 32 random bits (PCG32's XSH RR output).
    pub fn next_u32(&mut self) -> u32 {
        let old = self.0;
        self.0 = old.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        xorshifted.rotate_right((old >> 59) as u32)
    }
    /// Shuffles `v` in place (Fisher-Yates from the end, one draw per element).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u32() as usize) % (i + 1);
            v.swap(i, j);
        }
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// Chris Wellons' lowbias32 integer hash: the per-element randomness of dropout masks, here
/// and in dropout.wgsl.
pub fn lowbias32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// The keep threshold of inverted dropout with probability `p` (a uniform u32 hash at or above
/// p * 2^32 is kept, so with probability 1 - p) and the scale 1 / (1 - p) of what is kept.
pub fn dropout_threshold(p: f32) -> (u32, f32) {
    let threshold = (f64::from(p) * 4_294_967_296.0).round().min(f64::from(u32::MAX)) as u32;
    (threshold, 1.0 / (1.0 - p))
}

/// cos and sin of position x frequency for positions 0..max_pos, row-major (position, frequency),
/// each angle taken in f64 from the f32 product, as transformers computes it.
pub fn rope_table(inv_freq: &[f32], max_pos: usize) -> Vec<[f32; 2]> {
    let mut t = Vec::with_capacity(max_pos * inv_freq.len());
    for pos in 0..max_pos {
        for &f in inv_freq {
            let angle = f64::from(pos as f32 * f);
            t.push([angle.cos() as f32, angle.sin() as f32]);
        }
    }
    t
}

/// AdamW's bias corrections 1 - beta1^t and 1 - beta2^t after `step` steps, in f64 then
/// rounded, as torch computes them.
pub fn adamw_bias_corrections(beta1: f32, beta2: f32, step: u32) -> (f32, f32) {
    let t = i32::try_from(step).unwrap_or(i32::MAX);
    ((1.0 - f64::from(beta1).powi(t)) as f32, (1.0 - f64::from(beta2).powi(t)) as f32)
}

/// The index of the largest value: the first of equal maxima, NaN never chosen, 0 when no value
/// exceeds -infinity (greedy decoding, as argmax.wgsl picks on the GPU).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best.0
}

/// Work on fewer values than this stays on the calling thread.
const PARALLEL_FROM: usize = 1 << 20;
/// Runs a core gets on average, so that cores that finish early take over the rest.
const RUNS_A_CORE: usize = 4;

/// How many of `units` (whole blocks of `values` values in all) each run of
/// [`run_parallel`]'s jobs takes: all of them below [`PARALLEL_FROM`] values or on one core
/// (one run, on the calling thread), else a share of the cores (never 0).
pub(crate) fn units_a_run(units: usize, values: usize) -> usize {
    let cores = if values < PARALLEL_FROM { 1 } else { cores() };
    if cores < 2 {
        return units.max(1);
    }
    units.div_ceil(cores * RUNS_A_CORE).max(1)
}

/// The cores this process may use, asked once (the answer reads cgroup files on Linux).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()))
}

/// Runs `work` on every job, on as many of the CPU's cores as there are jobs; the calling
/// thread works too and returns when all are done. A thread that cannot be made leaves its jobs
/// to the others. For work whose result does not depend on which thread does which job.
pub(crate) fn run_parallel<J: Send>(jobs: Vec<J>, work: impl Fn(J) + Sync) {
    if jobs.len() < 2 {
        jobs.into_iter().for_each(work);
        return;
    }
    let threads = cores().min(jobs.len());
    let jobs: Vec<_> = jobs.into_iter().map(|j| std::sync::Mutex::new(Some(j))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = || {
        while let Some(job) = jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            if let Some(j) = job.lock().ok().and_then(|mut j| j.take()) {
                work(j);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            let _ = std::thread::Builder::new().name("edgetune-load".into()).spawn_scoped(s, take);
        }
        take();
    });
}

/// [`run_parallel`] for work that can fail: the first error a job returns is the result (jobs
/// not yet begun still run, and their errors are dropped).
pub(crate) fn try_parallel<J: Send>(jobs: Vec<J>, work: impl Fn(J) -> Result<(), String> + Sync) -> Result<(), String> {
    let failed = std::sync::Mutex::new(None);
    run_parallel(jobs, |j| {
        if let Err(e) = work(j)
            && let Ok(mut f) = failed.lock()
        {
            f.get_or_insert(e);
        }
    });
    failed.into_inner().ok().flatten().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference as r;

    /// Production's copies agree with the oracle's, which the kernel tests hold the GPU to.
    #[test]
    fn the_helpers_agree_with_the_oracles_copies() {
        for v in [0u32, 1, 7, 0xdead_beef, u32::MAX] {
            assert_eq!(lowbias32(v), r::lowbias32(v), "{v}");
        }
        for p in [0.0f32, 0.05, 0.1, 0.5, 0.999] {
            assert_eq!(dropout_threshold(p), r::dropout_threshold(p), "{p}");
        }
        let inv_freq = [1.0f32, 0.1, 1e-4];
        assert_eq!(rope_table(&inv_freq, 4096), r::rope_table(&inv_freq, 4096));
        for t in [1u32, 2, 10, 1000, u32::MAX] {
            assert_eq!(adamw_bias_corrections(0.9, 0.999, t), r::adamw_bias_corrections(0.9, 0.999, t), "{t}");
        }
        for x in [vec![], vec![f32::NAN, 1.0, 3.0, 3.0, -1.0], vec![f32::NEG_INFINITY; 3], vec![0.5, f32::INFINITY]] {
            assert_eq!(argmax(&x), r::argmax(&x), "{x:?}");
        }
    }
}
