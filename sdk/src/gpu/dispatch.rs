//! Buffers and dispatch on [`GpuContext`]: storage buffers, readback, the uniform ring that
//! holds kernel parameters, and recording one dispatch into an [`Encoder`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::{Counters, GpuContext, UniformRing};
use crate::gpu::profile::{Cost, Timer};
use crate::gpu::shaders::Shader;

/// Readbacks up to this size share one staging buffer of this size, kept by the context.
pub const KEPT_STAGING_BYTES: u64 = 1 << 20;
/// Bytes of the uniform ring that holds kernel parameters: 16,384 slots of 256 bytes.
const UNIFORM_RING_BYTES: u64 = 4 << 20;

/// The size of [`GpuContext::storage_zeroed`]'s buffer of `n_floats` values: whole vec4s, so
/// kernels that read vec4s see every element.
pub fn storage_bytes(n_floats: usize) -> u64 {
    (n_floats.max(1).next_multiple_of(4) * 4) as u64
}

impl GpuContext {
    /// A storage buffer holding `data` (padded to 16 bytes).
    pub fn storage_from<T: Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut padded;
        // Padded to whole vec4s, so kernels that read vec4s see every element.
        let contents = if !bytes.len().is_multiple_of(16) || bytes.is_empty() {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
            &padded[..]
        } else {
            bytes
        };
        Counters::add(&self.counters.buffers);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A zero-filled storage buffer of `n_floats` f32 (or u32) values ([`storage_bytes`] bytes).
    pub fn storage_zeroed(&self, label: &str, n_floats: usize) -> wgpu::Buffer {
        Counters::add(&self.counters.buffers);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: storage_bytes(n_floats),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// The scratch buffer of split reductions (matmuls split along K, attention split along
    /// its keys), holding at least `n_floats` values: one
    /// buffer for the whole context, reallocated (to the next power of two, at least 1 MiB) only
    /// when a larger split comes along, so steady-state steps create none. Dispatches that use
    /// it run one after another, as every dispatch here does.
    pub(crate) fn split_scratch(&self, n_floats: usize) -> Result<wgpu::Buffer> {
        let mut slot = self.scratch.lock().map_err(|_| Error::Gpu("scratch buffer lock poisoned".into()))?;
        let bytes = (n_floats * 4) as u64;
        if let Some(b) = slot.as_ref()
            && b.size() >= bytes
        {
            return Ok(b.clone());
        }
        let size = bytes.next_power_of_two().max(1 << 20);
        let advice = "lower batch_tokens (the scratch grows with the tokens of a pass)";
        let buf = self.allocating("the split-reduction scratch", size, advice, || {
            Ok(self.storage_zeroed("split-reduction scratch", (size / 4) as usize))
        })?;
        *slot = Some(buf.clone());
        Ok(buf)
    }

    /// Bytes the context holds for itself: the split-reduction scratch buffer, the kernel
    /// parameter ring and the readback staging buffer (each made at first use).
    pub fn runtime_bytes(&self) -> u64 {
        let size = |b: Option<&wgpu::Buffer>| b.map_or(0, |b| b.size());
        let scratch = self.scratch.lock().map_or(0, |s| size(s.as_ref()));
        let ring = self.uniforms.lock().map_or(0, |r| size(r.buf.as_ref()));
        let staging = self.staging.lock().map_or(0, |s| size(s.as_ref()));
        scratch + ring + staging
    }

    /// Reads `n` f32 values back from a buffer (blocking). Reads of up to
    /// [`KEPT_STAGING_BYTES`] go through one staging buffer the context keeps, so the losses,
    /// norms and logits read every step or token make no buffer.
    pub fn read_f32(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        self.read_f32_after(self.encoder(), buf, n)
    }

    /// Submits what `enc` recorded together with the copy of `n` f32 values of `buf` to the
    /// staging buffer, and returns them: one submission for work and readback (see
    /// [`GpuContext::read_f32`]).
    pub fn read_f32_after(&self, enc: Encoder, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let size = ((n * 4) as u64).max(4);
        let mut kept = self.staging.lock().map_err(|_| Error::Gpu("staging buffer lock poisoned".into()))?;
        let new = |size: u64| {
            Counters::add(&self.counters.buffers);
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let staging = if size <= KEPT_STAGING_BYTES {
            kept.get_or_insert_with(|| new(KEPT_STAGING_BYTES)).clone()
        } else {
            new(size)
        };
        let out = self.read_through(enc, buf, &staging, size, n);
        if out.is_err() {
            // It may be left mapped; the next read makes a fresh one.
            *kept = None;
        }
        out
    }

    fn read_through(
        &self,
        mut enc: Encoder,
        buf: &wgpu::Buffer,
        staging: &wgpu::Buffer,
        size: u64,
        n: usize,
    ) -> Result<Vec<f32>> {
        self.check()?;
        enc.copy_buffer_to_buffer(buf, 0, staging, 0, size);
        let words = self.finish_read(self.submit_and_map(enc, staging, size))?;
        Ok(words[..n].iter().map(|&w| f32::from_bits(w)).collect())
    }

    /// A buffer of `bytes` that the GPU copies into and the CPU maps to read (see
    /// [`GpuContext::submit_and_map`]).
    pub fn staging(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        Counters::add(&self.counters.buffers);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Submits `enc`, which ends with copies into the first `bytes` of `staging`, and asks for
    /// them to be mapped once the GPU is done, without waiting: [`GpuContext::finish_read`]
    /// collects them. Until then the staging buffer must not be used again. Every readback
    /// goes through this pair.
    pub fn submit_and_map(&self, enc: Encoder, staging: &wgpu::Buffer, bytes: u64) -> PendingRead {
        let submission = self.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        PendingRead { staging: staging.clone(), bytes, submission, rx }
    }

    /// Waits for a read started by [`GpuContext::submit_and_map`] (returning at once when the
    /// GPU has finished it) and returns its words, then unmaps the staging buffer.
    pub fn finish_read(&self, p: PendingRead) -> Result<Vec<u32>> {
        self.wait(Some(p.submission))?;
        p.rx.recv()
            .map_err(|_| Error::Gpu("readback callback dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        self.check()?;
        let slice = p.staging.slice(..p.bytes);
        let view = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("reading back a buffer: {e:?}")))?;
        let words = bytemuck::cast_slice::<u8, u32>(&view).to_vec();
        drop(view);
        p.staging.unmap();
        Ok(words)
    }

    /// An encoder that makes a new bind group for every dispatch: for one-off work whose
    /// buffers will not be seen again.
    pub fn encoder(&self) -> Encoder {
        Encoder {
            enc: self.device.create_command_encoder(&Default::default()),
            pass: None,
            binds: None,
            whole: false,
            hold: SlotHold { ring: self.uniforms.clone(), generation: 0, bytes: 0 },
            dispatches: 0,
            recorded: 0,
        }
    }

    /// An encoder that takes its bind groups from `binds`, making each only the first time its
    /// shader meets its buffers: for the buffers of a training workspace or a KV cache, which
    /// own `binds` and are reused every step or token.
    pub fn encoder_with(&self, binds: &Arc<BindGroups>) -> Encoder {
        Encoder { binds: Some(binds.clone()), ..self.encoder() }
    }

    /// Submits what `enc` holds (see [`GpuContext::submit`]) and leaves it empty, ready for more.
    pub fn submit_encoder(&self, enc: &mut Encoder) -> wgpu::SubmissionIndex {
        enc.pass = None;
        enc.dispatches = 0;
        let done = std::mem::replace(&mut enc.enc, self.device.create_command_encoder(&Default::default()));
        let hold = SlotHold { ring: self.uniforms.clone(), generation: enc.hold.generation, bytes: 0 };
        let hold = std::mem::replace(&mut enc.hold, hold);
        self.submit([Commands { buffer: Some(done.finish()), hold }])
    }

    /// Records one dispatch of `shader` with its params (binding 0) and storage buffers
    /// (bindings 1..). The params take a slot of the context's uniform ring (a dynamic offset),
    /// and every [`FLUSH_EVERY`](crate::gpu::context::FLUSH_EVERY) dispatches the encoder's
    /// contents are submitted, so the GPU starts on them while the rest is recorded.
    pub fn dispatch<P: Pod>(
        &self,
        enc: &mut Encoder,
        shader: &Shader,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<()> {
        self.record(
            enc,
            Dispatch { shader, buffers, groups, constants: &[] },
            bytemuck::bytes_of(params),
            Cost::default(),
            true,
        )
    }

    /// A slot of the uniform ring holding `bytes` for a dispatch recorded into `enc`: (buffer,
    /// offset). See [`UniformRing`] for when the ring goes round and when it starts anew.
    fn uniform_slot(&self, enc: &mut Encoder, bytes: &[u8]) -> Result<(wgpu::Buffer, u64)> {
        let mut ring = self.uniforms.lock().map_err(|_| Error::Gpu("uniform ring lock poisoned".into()))?;
        // 256 bytes (WebGPU's default alignment) on every adapter, so the ring holds the same
        // 16,384 slots everywhere.
        let align = u64::from(self.limits.min_uniform_buffer_offset_alignment).max(256);
        let slot = (bytes.len() as u64).next_multiple_of(align);
        let own = if enc.hold.generation == ring.generation { enc.hold.bytes } else { 0 };
        let others = ring.outstanding.saturating_sub(own);
        let wraps = ring.next + slot > UNIFORM_RING_BYTES;
        // This encoder alone holds the whole ring, or going round would write over slots that
        // another unsubmitted encoder reads: a new buffer, so no held slot is reused (the old
        // buffer lives on in the bind groups of the dispatches that read it).
        let full = own + slot > UNIFORM_RING_BYTES;
        if ring.buf.is_none() || full || (wraps && others > 0) {
            if ring.buf.is_some() {
                self.write_uniforms(&mut ring);
            }
            Counters::add(&self.counters.buffers);
            ring.buf = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel params"),
                size: UNIFORM_RING_BYTES,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
            ring.generation += 1;
            ring.next = 0;
            ring.pending.clear();
            ring.pending_start = 0;
            ring.outstanding = 0;
        } else if wraps {
            self.write_uniforms(&mut ring);
            ring.next = 0;
            ring.pending_start = 0;
        }
        let offset = ring.next;
        ring.pending.extend_from_slice(bytes);
        let len = (offset + slot - ring.pending_start) as usize;
        ring.pending.resize(len, 0);
        ring.next = offset + slot;
        if enc.hold.generation != ring.generation {
            // What it held in an older buffer can never be written over; from now on it holds
            // slots of this one.
            enc.hold.generation = ring.generation;
            enc.hold.bytes = 0;
        }
        enc.hold.bytes += slot;
        enc.dispatches += 1;
        enc.recorded += 1;
        ring.outstanding += slot;
        let buf = ring.buf.clone().ok_or_else(|| Error::Gpu("uniform ring missing".into()))?;
        Ok((buf, offset))
    }

    /// [`GpuContext::dispatch`] for a launcher that declares what the dispatch computes and
    /// moves, for the rates of `edgetune bench-train --profile`.
    pub fn dispatch_costed<P: Pod>(&self, enc: &mut Encoder, d: Dispatch<'_>, params: &P, cost: Cost) -> Result<()> {
        self.record(enc, d, bytemuck::bytes_of(params), cost, true)
    }

    /// Records one dispatch whose params are `params`' bytes. `may_submit: false` never
    /// submits first: for the second of two dispatches that share the split-reduction scratch
    /// buffer, which must run back to back.
    pub(crate) fn record(
        &self,
        enc: &mut Encoder,
        d: Dispatch<'_>,
        params: &[u8],
        cost: Cost,
        may_submit: bool,
    ) -> Result<()> {
        let Dispatch { shader, buffers, groups, constants } = d;
        let kernel = self.kernel(shader, constants, true)?;
        let profiling = self.profiling();
        if profiling == Some(Timer::WallClock) {
            self.flush(enc)?;
        } else if may_submit && !enc.whole && enc.dispatches >= self.submit_every {
            self.submit_encoder(enc);
        }
        Counters::add(&self.counters.dispatches);
        let (uniform, offset) = self.uniform_slot(enc, params)?;
        let make = || {
            Counters::add(&self.counters.bind_groups);
            let binding =
                wgpu::BufferBinding { buffer: &uniform, offset: 0, size: wgpu::BufferSize::new(params.len() as u64) };
            let mut entries =
                vec![wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::Buffer(binding) }];
            for (i, b) in buffers.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
            }
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(shader.name),
                layout: &kernel.layout,
                entries: &entries,
            })
        };
        let bind = match &enc.binds {
            Some(cache) => cache.get_or_make(shader.name, &uniform, buffers, make)?,
            None => make(),
        };
        let offset = u32::try_from(offset).map_err(|_| Error::Gpu("uniform ring offset past 4 GiB".into()))?;
        let run = |pass: &mut wgpu::ComputePass<'_>| {
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bind, &[offset]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        };
        match profiling {
            Some(Timer::GpuTimestamps) => self.timed_pass(enc, shader.name, cost, run)?,
            Some(Timer::WallClock) => {
                let t = std::time::Instant::now();
                run(&mut enc.enc.begin_compute_pass(&Default::default()));
                self.flush(enc)?;
                self.add_wall_time(shader.name, t.elapsed().as_secs_f64(), cost);
            }
            None => {
                if enc.pass.is_none() {
                    Counters::add(&self.counters.passes);
                }
                let pass = enc.pass.get_or_insert_with(|| {
                    enc.enc
                        .begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("edgetune"),
                            timestamp_writes: None,
                        })
                        .forget_lifetime()
                });
                run(pass);
            }
        }
        Ok(())
    }

    /// Submits what `enc` holds so far, waits for it, and leaves a fresh encoder in its place.
    fn flush(&self, enc: &mut Encoder) -> Result<()> {
        self.submit_encoder(enc);
        self.wait(None)?;
        Ok(())
    }
}

/// One dispatch: a shader, the storage buffers of its bindings after the params, and the
/// workgroup grid.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch<'a> {
    /// The kernel.
    pub shader: &'a Shader,
    /// Its storage buffers, bindings 1 and on.
    pub buffers: &'a [&'a wgpu::Buffer],
    /// Workgroups in x, y and z.
    pub groups: [u32; 3],
    /// The values of the pipeline constants the kernel is made with (see
    /// [`GpuContext::pipeline`]).
    pub constants: &'a [(&'static str, u32)],
}

/// A readback on its way: see [`GpuContext::submit_and_map`].
#[derive(Debug)]
pub struct PendingRead {
    staging: wgpu::Buffer,
    bytes: u64,
    submission: wgpu::SubmissionIndex,
    rx: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

/// A command encoder that launchers record into. Dispatches go into one open compute pass,
/// which is closed when the encoder is used for anything else (a copy, through `DerefMut`) or
/// finished; bind groups come from the [`BindGroups`] it was made with, if any (see
/// [`GpuContext::encoder_with`]).
#[derive(Debug)]
pub struct Encoder {
    enc: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    binds: Option<Arc<BindGroups>>,
    /// Never submitted part-way (see [`Encoder::whole`]).
    whole: bool,
    /// The parameter slots its dispatches took since it was last submitted.
    hold: SlotHold,
    /// Dispatches recorded since it was last submitted.
    dispatches: u64,
    /// Dispatches recorded since it was made.
    recorded: u64,
}

impl Encoder {
    /// Records everything for one submission at the end, however many dispatches: for short
    /// work such as a decoded token, where a submission part-way costs more than it overlaps.
    pub fn whole(mut self) -> Self {
        self.whole = true;
        self
    }

    /// Dispatches recorded into this encoder since it was made, submitted part-way or not:
    /// what one piece of work records, where the context's [`GpuContext::counts`] also count
    /// what other threads record on the same context.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// Closes the open pass and finishes the commands, ready for [`GpuContext::submit`].
    pub fn finish(self) -> Commands {
        let Encoder { enc, pass, hold, .. } = self;
        drop(pass);
        Commands { buffer: Some(enc.finish()), hold }
    }
}

/// Finished commands for [`GpuContext::submit`], with the kernel-parameter slots they read,
/// which stay taken until they are submitted (or given back if they are dropped).
#[derive(Debug)]
pub struct Commands {
    pub(crate) buffer: Option<wgpu::CommandBuffer>,
    pub(crate) hold: SlotHold,
}

/// Bytes of one buffer (`generation`) of the uniform ring held by an encoder or its finished
/// commands; dropped unsubmitted, they are given back.
#[derive(Debug)]
pub(crate) struct SlotHold {
    ring: Arc<Mutex<UniformRing>>,
    pub(crate) generation: u64,
    pub(crate) bytes: u64,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            ring.release(self.generation, self.bytes);
        }
    }
}

impl std::ops::Deref for Encoder {
    type Target = wgpu::CommandEncoder;
    fn deref(&self) -> &wgpu::CommandEncoder {
        &self.enc
    }
}

impl std::ops::DerefMut for Encoder {
    /// Closes the open compute pass first, so what is recorded next comes after its dispatches.
    fn deref_mut(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.enc
    }
}

/// Bind groups that belong to one set of long-lived buffers (a training workspace, a KV cache)
/// and are made the first time a shader meets a given list of buffers, then reused: a training
/// step or decoded token after the first makes none. Dropping it releases the bind groups and
/// with them the hold they have on their buffers.
#[derive(Debug, Default)]
pub struct BindGroups {
    map: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
}

/// A shader and the buffers of its bindings, the uniform ring first.
type BindKey = (&'static str, Vec<wgpu::Buffer>);

/// Entries past which a [`BindGroups`] starts again, so that one used with ever-new buffers
/// cannot hold them all alive; far more than the dispatches of a training step of an 8B model.
const MAX_BIND_GROUPS: usize = 1 << 16;

impl BindGroups {
    /// A new, empty set, to be shared by the encoders that record over one set of buffers.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// How many bind groups it holds.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get_or_make(
        &self,
        shader: &'static str,
        uniform: &wgpu::Buffer,
        buffers: &[&wgpu::Buffer],
        make: impl FnOnce() -> wgpu::BindGroup,
    ) -> Result<wgpu::BindGroup> {
        let mut map = self.map.lock().map_err(|_| Error::Gpu("bind group cache poisoned".into()))?;
        let mut key_buffers = Vec::with_capacity(buffers.len() + 1);
        key_buffers.push(uniform.clone());
        key_buffers.extend(buffers.iter().map(|&b| b.clone()));
        let key = (shader, key_buffers);
        if let Some(b) = map.get(&key) {
            return Ok(b.clone());
        }
        if map.len() >= MAX_BIND_GROUPS {
            map.clear();
        }
        let bind = make();
        map.insert(key, bind.clone());
        Ok(bind)
    }
}
