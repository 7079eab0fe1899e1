//! Kernel profiling for benchmarks: the GPU time of every dispatch, from timestamp queries
//! where the adapter has them, else from wall-clock time around each dispatch waited for; summed
//! by shader with the arithmetic and memory traffic the launchers declare.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::dispatch::Encoder;

/// How profiled dispatches are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Timer {
    /// Timestamps the GPU writes at the start and end of each dispatch's pass; the dispatches
    /// run as they would unprofiled, one after another.
    GpuTimestamps,
    /// Wall-clock time around each dispatch, submitted on its own and waited for: overstates
    /// small kernels by the submission's cost.
    WallClock,
}

/// What one dispatch computes and moves, as its launcher declares it: floating-point operations
/// (a multiply-add counts two) and bytes read and written in its buffers. Zero when not
/// declared.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Floating-point operations (a multiply-add counts two).
    pub flops: f64,
    /// Bytes read and written in global memory, at least once each.
    pub bytes: f64,
}

/// One shader's total while profiling.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelTime {
    /// Its dispatches.
    pub dispatches: u64,
    /// Their time on the GPU (or the wall clock where the adapter has no timestamps).
    pub seconds: f64,
    /// Their declared floating-point operations.
    pub flops: f64,
    /// Their declared bytes moved.
    pub bytes: f64,
}

impl KernelTime {
    /// Arithmetic rate, where the launcher declared its operations.
    pub fn gflops(&self) -> Option<f64> {
        (self.flops > 0.0 && self.seconds > 0.0).then(|| self.flops / self.seconds / 1e9)
    }
    /// Memory rate, where the launcher declared its traffic.
    pub fn gbytes_per_s(&self) -> Option<f64> {
        (self.bytes > 0.0 && self.seconds > 0.0).then(|| self.bytes / self.seconds / 1e9)
    }
}

/// Pairs of timestamps one query set holds (WebGPU allows 4,096 queries in a set).
const PAIRS: u32 = 2048;

/// The profile being gathered (see [`GpuContext::start_profiling`]).
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) timer: Timer,
    times: HashMap<&'static str, KernelTime>,
    queries: Option<Queries>,
}

/// Timestamp queries in flight: the pairs written by recorded dispatches, not yet read.
#[derive(Debug)]
struct Queries {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    pending: Vec<(&'static str, Cost)>,
    /// Nanoseconds per timestamp tick.
    period: f64,
}

impl Profile {
    fn add(&mut self, name: &'static str, seconds: f64, cost: Cost) {
        let e = self.times.entry(name).or_default();
        e.dispatches += 1;
        e.seconds += seconds;
        e.flops += cost.flops;
        e.bytes += cost.bytes;
    }
}

impl GpuContext {
    /// Starts profiling (clearing earlier figures) with the timer wanted, or wall-clock time
    /// where the adapter has no timestamp queries; returns the timer in use. Meant for
    /// benchmarks: with wall-clock time every dispatch is submitted and waited for on its own.
    pub fn start_profiling(&self, want: Timer) -> Timer {
        let timer = if want == Timer::GpuTimestamps && self.report.timestamp_query {
            Timer::GpuTimestamps
        } else {
            Timer::WallClock
        };
        let queries = (timer == Timer::GpuTimestamps).then(|| {
            let bytes = u64::from(PAIRS) * 16;
            let buffer = |label, usage| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            Queries {
                set: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2 * PAIRS,
                }),
                resolve: buffer("timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
                read: buffer("timestamps read", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
                pending: Vec::new(),
                period: f64::from(self.queue.get_timestamp_period()),
            }
        });
        if let Ok(mut p) = self.profile.lock() {
            *p = Some(Profile { timer, times: HashMap::new(), queries });
        }
        timer
    }

    /// Stops profiling and returns the per-shader totals, slowest first. Work recorded while
    /// profiling must have been submitted.
    pub fn stop_profiling(&self) -> Result<Vec<(&'static str, KernelTime)>> {
        let mut slot = self.profile.lock().map_err(|_| Error::Gpu("profile lock poisoned".into()))?;
        let Some(mut p) = slot.take() else { return Ok(Vec::new()) };
        self.read_timestamps(&mut p)?;
        let mut v: Vec<_> = p.times.into_iter().collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        Ok(v)
    }

    /// The timer of the profile being gathered, if any.
    pub fn profiling(&self) -> Option<Timer> {
        self.profile.lock().ok().and_then(|p| p.as_ref().map(|p| p.timer))
    }

    /// Records one profiled dispatch in a pass of its own that writes timestamps before and
    /// after it; when the query set is full, submits `enc` and reads the timestamps first.
    pub(crate) fn timed_pass(
        &self,
        enc: &mut Encoder,
        name: &'static str,
        cost: Cost,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>),
    ) -> Result<()> {
        let mut slot = self.profile.lock().map_err(|_| Error::Gpu("profile lock poisoned".into()))?;
        let p = slot.as_mut().ok_or_else(|| Error::Gpu("not profiling".into()))?;
        if p.queries.as_ref().is_some_and(|q| q.pending.len() as u32 == PAIRS) {
            self.submit_encoder(enc);
            self.read_timestamps(p)?;
        }
        let q = p.queries.as_mut().ok_or_else(|| Error::Gpu("no timestamp queries".into()))?;
        let i = q.pending.len() as u32;
        let writes = wgpu::ComputePassTimestampWrites {
            query_set: &q.set,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        };
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(name), timestamp_writes: Some(writes) });
            record(&mut pass);
        }
        q.pending.push((name, cost));
        Ok(())
    }

    /// Adds a wall-clock measurement of one dispatch to the profile.
    pub(crate) fn add_wall_time(&self, name: &'static str, seconds: f64, cost: Cost) {
        if let Ok(mut slot) = self.profile.lock()
            && let Some(p) = slot.as_mut()
        {
            p.add(name, seconds, cost);
        }
    }

    /// Resolves and reads the timestamps of the pending dispatches (which have been submitted)
    /// and adds them to the profile.
    fn read_timestamps(&self, p: &mut Profile) -> Result<()> {
        let Some(q) = p.queries.as_mut() else { return Ok(()) };
        if q.pending.is_empty() {
            return Ok(());
        }
        let n = q.pending.len() as u32;
        let bytes = u64::from(n) * 16;
        let mut enc = self.encoder();
        enc.resolve_query_set(&q.set, 0..2 * n, &q.resolve, 0);
        enc.copy_buffer_to_buffer(&q.resolve, 0, &q.read, 0, bytes);
        let words = self.finish_read(self.submit_and_map(enc, &q.read, bytes))?;
        let ticks: Vec<u64> = words.chunks(2).map(|w| u64::from(w[0]) | (u64::from(w[1]) << 32)).collect();
        let period = q.period;
        let pending = std::mem::take(&mut q.pending);
        for (i, (name, cost)) in pending.into_iter().enumerate() {
            let (begin, end) = (ticks[2 * i], ticks[2 * i + 1]);
            p.add(name, end.saturating_sub(begin) as f64 * period * 1e-9, cost);
        }
        Ok(())
    }
}
