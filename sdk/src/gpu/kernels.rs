//! The WGSL kernels: sources embedded at build time, `#include` expansion, one `#[repr(C)]`
//! params struct per shader (with a compile-time size check against the WGSL struct), and typed
//! launchers that record a dispatch into a command encoder.

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::{Counters, GpuContext};

/// A WGSL shader known to edgetune: a source file and, for a variant, the module constants it
/// overrides. The name says what a variant changes (`matmul_nf4.m1`) and keys the pipeline cache.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    /// `const NAME: u32 = VALUE;` lines to replace, as (NAME, VALUE).
    pub defines: &'static [(&'static str, &'static str)],
}

impl Shader {
    /// Whether the shader needs the adapter's subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        expand(self).map(|s| s.contains("subgroup")).unwrap_or(false)
    }
}

macro_rules! shader {
    ($id:ident, $file:literal) => {
        shader!($id, $file, $file, []);
    };
    ($id:ident, $file:literal, $name:expr, [$(($k:literal, $v:literal)),*]) => {
        pub const $id: Shader = Shader {
            name: $name,
            source: include_str!(concat!("../../../shaders/", $file, ".wgsl")),
            defines: &[$(($k, $v)),*],
        };
    };
}

shader!(EMBEDDING, "embedding");
shader!(EMBEDDING_F16, "embedding_f16");
shader!(RMS_NORM, "rms_norm");
shader!(ROPE, "rope");
shader!(SILU_MUL, "silu_mul");
shader!(ADD, "add");
shader!(DROPOUT, "dropout");
shader!(F16_PACK, "f16_pack");
shader!(F16_UNPACK, "f16_unpack");
shader!(CROSS_ENTROPY, "cross_entropy");
shader!(MATMUL, "matmul");
shader!(MATMUL_NF4, "matmul_nf4");
shader!(MATMUL_F16, "matmul_f16");
// One-row variants for decoding: the 4-row kernels would spend 3/4 of their multiply-adds on
// padding when M = 1.
shader!(MATVEC, "matvec");
shader!(MATVEC_NF4, "matvec_nf4");
shader!(MATVEC_F16, "matvec_f16");
shader!(ATTENTION, "attention");
shader!(ADAMW, "adamw");
shader!(GRAD_NORM, "grad_norm");
shader!(CROSS_ENTROPY_BACKWARD, "cross_entropy_backward");
shader!(MATMUL_BACKWARD, "matmul_backward");
shader!(MATMUL_NF4_BACKWARD, "matmul_nf4_backward");
shader!(MATMUL_F16_BACKWARD, "matmul_f16_backward");
shader!(MATMUL_BACKWARD_W, "matmul_backward_w");
shader!(RMS_NORM_BACKWARD, "rms_norm_backward");
shader!(ROPE_BACKWARD, "rope_backward");
shader!(SILU_MUL_BACKWARD, "silu_mul_backward");
shader!(ATTENTION_BACKWARD_Q, "attention_backward_q");
shader!(ATTENTION_BACKWARD_KV, "attention_backward_kv");
shader!(MATMUL_SPLIT_REDUCE, "matmul_split_reduce");
// Register-tiled variants for CPU rasterizers (shaders/common/simd8.wgsl).
shader!(MATMUL_SIMD8, "matmul_simd8");
shader!(MATMUL_F16_SIMD8, "matmul_f16_simd8");
shader!(MATMUL_NF4_SIMD8, "matmul_nf4_simd8");
shader!(MATVEC_SIMD8, "matmul_simd8", "matmul_simd8.one_row", [("ONE_ROW", "1")]);
shader!(MATVEC_F16_SIMD8, "matmul_f16_simd8", "matmul_f16_simd8.one_row", [("ONE_ROW", "1")]);
shader!(MATVEC_NF4_SIMD8, "matmul_nf4_simd8", "matmul_nf4_simd8.one_row", [("ONE_ROW", "1")]);
shader!(MATMUL_BACKWARD_SIMD8, "matmul_backward_simd8");
shader!(MATMUL_F16_BACKWARD_SIMD8, "matmul_f16_backward_simd8");
shader!(MATMUL_NF4_BACKWARD_SIMD8, "matmul_nf4_backward_simd8");
shader!(MATMUL_BACKWARD_W_SIMD8, "matmul_backward_w_simd8");
shader!(ATTENTION_SIMD8, "attention_simd8");
shader!(ATTENTION_SIMD8_HD64, "attention_simd8", "attention_simd8.hd64", [("HD4", "16")]);
shader!(ATTENTION_BACKWARD_Q_SIMD8, "attention_backward_q_simd8");
shader!(
    ATTENTION_BACKWARD_Q_SIMD8_HD64,
    "attention_backward_q_simd8",
    "attention_backward_q_simd8.hd64",
    [("HD4", "16")]
);
shader!(ATTENTION_BACKWARD_KV_SIMD8, "attention_backward_kv_simd8");
shader!(
    ATTENTION_BACKWARD_KV_SIMD8_HD64,
    "attention_backward_kv_simd8",
    "attention_backward_kv_simd8.hd64",
    [("HD4", "16")]
);

/// Every shader, so tests can compile each one on the adapter.
pub const ALL_SHADERS: &[Shader] = &[
    EMBEDDING,
    EMBEDDING_F16,
    RMS_NORM,
    ROPE,
    SILU_MUL,
    ADD,
    DROPOUT,
    F16_PACK,
    F16_UNPACK,
    CROSS_ENTROPY,
    MATMUL,
    MATMUL_NF4,
    MATMUL_F16,
    MATVEC,
    MATVEC_NF4,
    MATVEC_F16,
    ATTENTION,
    ADAMW,
    GRAD_NORM,
    CROSS_ENTROPY_BACKWARD,
    MATMUL_BACKWARD,
    MATMUL_NF4_BACKWARD,
    MATMUL_F16_BACKWARD,
    MATMUL_BACKWARD_W,
    RMS_NORM_BACKWARD,
    ROPE_BACKWARD,
    SILU_MUL_BACKWARD,
    ATTENTION_BACKWARD_Q,
    ATTENTION_BACKWARD_KV,
    MATMUL_SPLIT_REDUCE,
    MATMUL_SIMD8,
    MATMUL_F16_SIMD8,
    MATMUL_NF4_SIMD8,
    MATVEC_SIMD8,
    MATVEC_F16_SIMD8,
    MATVEC_NF4_SIMD8,
    MATMUL_BACKWARD_SIMD8,
    MATMUL_F16_BACKWARD_SIMD8,
    MATMUL_NF4_BACKWARD_SIMD8,
    MATMUL_BACKWARD_W_SIMD8,
    ATTENTION_SIMD8,
    ATTENTION_SIMD8_HD64,
    ATTENTION_BACKWARD_Q_SIMD8,
    ATTENTION_BACKWARD_Q_SIMD8_HD64,
    ATTENTION_BACKWARD_KV_SIMD8,
    ATTENTION_BACKWARD_KV_SIMD8_HD64,
];

const SNIPPETS: &[(&str, &str)] = &[
    ("common/nf4.wgsl", include_str!("../../../shaders/common/nf4.wgsl")),
    ("common/matmul.wgsl", include_str!("../../../shaders/common/matmul.wgsl")),
    ("common/matvec.wgsl", include_str!("../../../shaders/common/matvec.wgsl")),
    ("common/matmul_forward.wgsl", include_str!("../../../shaders/common/matmul_forward.wgsl")),
    ("common/matmul_dx.wgsl", include_str!("../../../shaders/common/matmul_dx.wgsl")),
    ("common/embedding.wgsl", include_str!("../../../shaders/common/embedding.wgsl")),
    ("common/params.wgsl", include_str!("../../../shaders/common/params.wgsl")),
    ("common/matmul_store.wgsl", include_str!("../../../shaders/common/matmul_store.wgsl")),
    ("common/simd8.wgsl", include_str!("../../../shaders/common/simd8.wgsl")),
    ("common/simd8_forward.wgsl", include_str!("../../../shaders/common/simd8_forward.wgsl")),
    ("common/simd8_dx.wgsl", include_str!("../../../shaders/common/simd8_dx.wgsl")),
    ("common/attention_simd8.wgsl", include_str!("../../../shaders/common/attention_simd8.wgsl")),
];

/// Expands a shader's source: `#include "common/x.wgsl"` lines (recursively, each snippet once),
/// `#for VAR in A..B` ... `#end` blocks (see [`unroll`]), and the `const` overrides of a variant.
pub fn expand(shader: &Shader) -> Result<String> {
    let mut out = String::with_capacity(shader.source.len());
    let mut included = Vec::new();
    include_into(shader, shader.source, &mut out, &mut included)?;
    let mut out = unroll(shader.name, &out)?;
    for (name, value) in shader.defines {
        let prefix = format!("const {name}: u32 = ");
        let start = out
            .find(&prefix)
            .ok_or_else(|| Error::Gpu(format!("shader {}: no `{prefix}...` to override", shader.name)))?;
        let end = start
            + out[start..]
                .find(';')
                .ok_or_else(|| Error::Gpu(format!("shader {}: unterminated const", shader.name)))?;
        out.replace_range(start..end, &format!("{prefix}{value}"));
    }
    Ok(out)
}

fn include_into(shader: &Shader, source: &str, out: &mut String, included: &mut Vec<&'static str>) -> Result<()> {
    for line in source.lines() {
        if let Some(rest) = line.trim().strip_prefix("#include") {
            let name = rest.trim().trim_matches('"');
            let snippet = SNIPPETS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| Error::Gpu(format!("shader {}: unknown include {name:?}", shader.name)))?;
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
    let bad = |what: String| Error::Gpu(format!("shader {name}: {what}"));
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
    EmbeddingParams { n_tokens: u32, dim: u32, row_start: u32, row_count: u32 } = 16);
params!(/// `rms_norm.wgsl`
    RmsNormParams { n_rows: u32, dim: u32, eps: f32, _pad: u32 } = 16);
params!(/// `rope.wgsl`
    RopeParams { n_tokens: u32, n_heads: u32, head_dim: u32, pos_offset: u32 } = 16);
params!(/// `dropout.wgsl`
    DropoutParams { n: u32, seed: u32, threshold: u32, scale: f32 } = 16);
params!(/// `silu_mul.wgsl` and `add.wgsl`
    ElementwiseParams { n: u32, _pad0: u32, _pad1: u32, _pad2: u32 } = 16);
params!(/// `cross_entropy.wgsl` and `cross_entropy_backward.wgsl`
    CrossEntropyParams { n_rows: u32, vocab: u32, grad_scale: f32, _pad: u32 } = 16);
params!(/// every matmul kernel (`common/matmul.wgsl`)
    MatmulParams {
        m: u32, n: u32, k: u32, has_bias: u32, y_stride: u32, y_col_offset: u32, block_size: u32, accumulate: u32,
        alpha: f32, w_offset: u32, dy_stride: u32, dy_col_offset: u32, split_k: u32, _pad0: u32, _pad1: u32,
        _pad2: u32,
    } = 64);
params!(/// `adamw.wgsl`
    AdamwParams {
        n: u32, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, bias_c1: f32, bias_c2: f32,
        grad_scale: f32, max_grad_norm: f32, _pad1: u32, _pad2: u32,
    } = 48);
params!(/// `grad_norm.wgsl`
    GradNormParams { n: u32, final_pass: u32, n_groups: u32, _pad: u32 } = 16);
params!(/// `attention.wgsl`
    AttentionParams { n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32, pos_offset: u32, kv_stride: u32, scale: f32, _pad: u32 } = 32);

/// Bytes of the uniform ring that holds kernel parameters: 16,384 slots of 256 bytes.
const UNIFORM_RING_BYTES: u64 = 4 << 20;
/// Splits a 1-D workgroup count over x and y (each at most 65535); shaders recombine it as
/// `gid.x + gid.y * 65535 * workgroup_size`.
fn groups_1d(n: u32) -> [u32; 3] {
    if n <= 65535 { [n.max(1), 1, 1] } else { [65535, n.div_ceil(65535), 1] }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} does not fit the GPU's 32-bit indices")))
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

    /// A zero-filled storage buffer of `n_floats` f32 (or u32) values.
    pub fn storage_zeroed(&self, label: &str, n_floats: usize) -> wgpu::Buffer {
        Counters::add(&self.counters.buffers);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            // Whole vec4s, so kernels that read vec4s see every element.
            size: (n_floats.max(1).next_multiple_of(4) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// The scratch buffer of split matmul reductions, holding at least `n_floats` values: one
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
        let buf = self.storage_zeroed("split matmul scratch", (size / 4) as usize);
        *slot = Some(buf.clone());
        Ok(buf)
    }

    /// Bytes the context holds for itself: the split-reduction scratch buffer and the kernel
    /// parameter ring (each made at first use).
    pub fn runtime_bytes(&self) -> u64 {
        let scratch = self.scratch.lock().ok().and_then(|s| s.as_ref().map(|b| b.size())).unwrap_or(0);
        let ring = self.uniforms.lock().ok().and_then(|r| r.buf.as_ref().map(|b| b.size())).unwrap_or(0);
        scratch + ring
    }

    /// Reads `n` f32 values back from a buffer (blocking).
    pub fn read_f32(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let size = (n * 4) as u64;
        Counters::add(&self.counters.buffers);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.check()?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size.max(4));
        self.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback callback dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping readback buffer: {e}")))?;
        self.check()?;
        let view = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("reading back a buffer: {e:?}")))?;
        let out = bytemuck::cast_slice::<u8, f32>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out[..n].to_vec())
    }

    /// Records one dispatch of `shader` with its params (binding 0) and storage buffers
    /// (bindings 1..). The params take a slot of the context's uniform ring rather than a
    /// buffer of their own, and every [`FLUSH_EVERY`](crate::gpu::context::FLUSH_EVERY) dispatches the encoder's contents are
    /// submitted, so the GPU starts on them while the rest is recorded.
    pub fn dispatch<P: Pod>(
        &self,
        enc: &mut wgpu::CommandEncoder,
        shader: &Shader,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<()> {
        self.record(enc, shader, bytemuck::bytes_of(params), buffers, groups, true)
    }

    /// A slot of the uniform ring holding `bytes`: (buffer, offset).
    fn uniform_slot(&self, bytes: &[u8]) -> Result<(wgpu::Buffer, u64)> {
        let mut ring = self.uniforms.lock().map_err(|_| Error::Gpu("uniform ring lock poisoned".into()))?;
        // 256 bytes (WebGPU's default alignment) on every adapter, so the ring holds the same
        // 16,384 slots everywhere.
        let align = u64::from(self.limits.min_uniform_buffer_offset_alignment).max(256);
        let slot = (bytes.len() as u64).next_multiple_of(align);
        let wraps = ring.next + slot > UNIFORM_RING_BYTES;
        // The whole ring recorded since the last submission: a new ring, so no slot that an
        // unsubmitted dispatch reads is reused (the old buffer lives on in its bind groups).
        let full = ring.unsubmitted_bytes + slot > UNIFORM_RING_BYTES;
        if ring.buf.is_none() || full {
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
            ring.next = 0;
            ring.pending.clear();
            ring.pending_start = 0;
            ring.unsubmitted_bytes = 0;
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
        ring.unsubmitted += 1;
        ring.unsubmitted_bytes += slot;
        let buf = ring.buf.clone().ok_or_else(|| Error::Gpu("uniform ring missing".into()))?;
        Ok((buf, offset))
    }

    /// Records one dispatch whose params are `params`' bytes. `may_submit: false` never
    /// submits first: for the second of two dispatches that share the split-reduction scratch
    /// buffer, which must run back to back.
    pub(crate) fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        shader: &Shader,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
        may_submit: bool,
    ) -> Result<()> {
        let pipeline = self.pipeline(shader)?;
        let profiling = self.profile.lock().map(|p| p.is_some()).unwrap_or(false);
        if profiling {
            self.flush(enc)?;
        } else if may_submit && self.uniforms.lock().map(|r| r.unsubmitted >= self.submit_every).unwrap_or(false) {
            let done = std::mem::replace(enc, self.device.create_command_encoder(&Default::default()));
            self.submit([done.finish()]);
        }
        Counters::add(&self.counters.dispatches);
        Counters::add(&self.counters.bind_groups);
        let (uniform, offset) = self.uniform_slot(params)?;
        let binding =
            wgpu::BufferBinding { buffer: &uniform, offset, size: wgpu::BufferSize::new(params.len() as u64) };
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::Buffer(binding) }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(shader.name),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let t = std::time::Instant::now();
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(shader.name), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        if profiling {
            self.flush(enc)?;
            if let Ok(mut p) = self.profile.lock()
                && let Some(e) = p.as_mut().map(|m| m.entry(shader.name).or_default())
            {
                e.dispatches += 1;
                e.seconds += t.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// Submits what `enc` holds so far, waits for it, and leaves a fresh encoder in its place.
    fn flush(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        let done = std::mem::replace(enc, self.device.create_command_encoder(&Default::default()));
        self.submit([done.finish()]);
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        Ok(())
    }
}

/// Typed launchers, one per kernel. Shapes are given in elements; every launcher records into
/// `enc` and returns immediately.
pub mod launch {
    use super::*;

    /// out[t, :] = table[ids[t] - row_start, :] for ids in [row_start, row_start + row_count).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        ids: &wgpu::Buffer,
        table: Rows<'_>,
        out: &wgpu::Buffer,
        n_tokens: usize,
        dim: usize,
        row_start: usize,
        row_count: usize,
    ) -> Result<()> {
        let p = EmbeddingParams {
            n_tokens: u32_of(n_tokens, "tokens")?,
            dim: u32_of(dim, "dim")?,
            row_start: u32_of(row_start, "row")?,
            row_count: u32_of(row_count, "rows")?,
        };
        let groups = [p.dim.div_ceil(64), p.n_tokens, 1];
        match table {
            Rows::F32(t) => ctx.dispatch(enc, &EMBEDDING, &p, &[ids, t, out], groups),
            Rows::F16(t) => ctx.dispatch(enc, &EMBEDDING_F16, &p, &[ids, t, out], groups),
        }
    }

    /// A table of rows (embeddings, lm_head) in f32 or in packed f16 pairs.
    #[derive(Debug, Clone, Copy)]
    pub enum Rows<'a> {
        F32(&'a wgpu::Buffer),
        F16(&'a wgpu::Buffer),
    }

    /// y = rms_norm(x) * w over rows of `dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n_rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let p = RmsNormParams { n_rows: u32_of(n_rows, "rows")?, dim: u32_of(dim, "dim")?, eps, _pad: 0 };
        ctx.dispatch(enc, &RMS_NORM, &p, &[x, w, y], groups_1d(p.n_rows))
    }

    /// Where the tokens of a RoPE call sit: token t at `pos_offset + positions[t]`.
    #[derive(Debug, Clone, Copy)]
    pub struct RopeShape<'a> {
        pub n_tokens: usize,
        pub n_heads: usize,
        pub head_dim: usize,
        pub pos_offset: usize,
        /// (T) u32 positions.
        pub positions: &'a wgpu::Buffer,
    }

    fn rope(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        shader: &Shader,
        x: &wgpu::Buffer,
        cos_sin: &wgpu::Buffer,
        s: RopeShape<'_>,
    ) -> Result<()> {
        let p = RopeParams {
            n_tokens: u32_of(s.n_tokens, "tokens")?,
            n_heads: u32_of(s.n_heads, "heads")?,
            head_dim: u32_of(s.head_dim, "head_dim")?,
            pos_offset: u32_of(s.pos_offset, "position")?,
        };
        ctx.dispatch(
            enc,
            shader,
            &p,
            &[x, cos_sin, s.positions],
            [(p.head_dim / 2).div_ceil(64), p.n_heads, p.n_tokens],
        )
    }

    /// In-place RoPE on x (T, n_heads * head_dim).
    pub fn rope_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        cos_sin: &wgpu::Buffer,
        s: RopeShape<'_>,
    ) -> Result<()> {
        rope(ctx, enc, &ROPE, x, cos_sin, s)
    }

    /// In-place RoPE backward on dx (T, n_heads * head_dim): the inverse rotation.
    pub fn rope_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        dx: &wgpu::Buffer,
        cos_sin: &wgpu::Buffer,
        s: RopeShape<'_>,
    ) -> Result<()> {
        rope(ctx, enc, &ROPE_BACKWARD, dx, cos_sin, s)
    }

    /// dx += d rms_norm(x) / dx applied to dy (the norm weight is frozen).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        n_rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let p = RmsNormParams { n_rows: u32_of(n_rows, "rows")?, dim: u32_of(dim, "dim")?, eps, _pad: 0 };
        ctx.dispatch(enc, &RMS_NORM_BACKWARD, &p, &[x, w, dy, dx], groups_1d(p.n_rows))
    }

    /// out = silu(gate) * up over n values.
    pub fn silu_mul_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
        ctx.dispatch(enc, &SILU_MUL, &p, &[gate, up, out], groups_1d(p.n.div_ceil(256)))
    }

    /// dgate, dup of out = silu(gate) * up, given dout.
    #[allow(clippy::too_many_arguments)]
    pub fn silu_mul_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        dout: &wgpu::Buffer,
        dgate: &wgpu::Buffer,
        dup: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
        ctx.dispatch(enc, &SILU_MUL_BACKWARD, &p, &[gate, up, dout, dgate, dup], groups_1d(p.n.div_ceil(256)))
    }

    /// Inverted dropout in place over n values with keep probability 1 - p and the mask of
    /// `seed` (see `dropout.wgsl`); also its own backward.
    pub fn dropout(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        n: usize,
        p: f32,
        seed: u32,
    ) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("dropout", format!("p must be in [0, 1) (got {p})")));
        }
        let (threshold, scale) = crate::reference::dropout_threshold(p);
        let params = DropoutParams { n: u32_of(n, "elements")?, seed, threshold, scale };
        ctx.dispatch(enc, &DROPOUT, &params, &[x], groups_1d(params.n.div_ceil(256)))
    }

    /// Stores n f32 values of `x` as f16 in `packed` (ceil(n / 2) words, two halves each, low
    /// half first) and rounds `x` in place to the stored values (see `f16_pack.wgsl`).
    pub fn f16_pack(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        packed: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        check_f16_sizes(x, packed, n)?;
        let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
        ctx.dispatch(enc, &F16_PACK, &p, &[x, packed], groups_1d(p.n.div_ceil(512)))
    }

    /// Reads n values stored by [`f16_pack`] back into `x` as f32.
    pub fn f16_unpack(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        packed: &wgpu::Buffer,
        x: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        check_f16_sizes(x, packed, n)?;
        let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
        ctx.dispatch(enc, &F16_UNPACK, &p, &[packed, x], groups_1d(p.n.div_ceil(512)))
    }

    fn check_f16_sizes(x: &wgpu::Buffer, packed: &wgpu::Buffer, n: usize) -> Result<()> {
        if x.size() < (n * 4) as u64 || packed.size() < (n.div_ceil(2) * 4) as u64 {
            return Err(Error::invalid(
                "f16 activation buffers",
                format!(
                    "{n} values need {} bytes of f32 and {} of f16 (got {} and {})",
                    n * 4,
                    n.div_ceil(2) * 4,
                    x.size(),
                    packed.size()
                ),
            ));
        }
        Ok(())
    }

    /// y += x over n values. Also the backward of a residual connection where two gradient
    /// branches meet.
    pub fn add_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
        ctx.dispatch(enc, &ADD, &p, &[x, y], groups_1d(p.n.div_ceil(256)))
    }

    /// loss[t] = logsumexp(logits[t]) - logits[t, target[t]]; target u32::MAX scores 0.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        loss: &wgpu::Buffer,
        n_rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let p = CrossEntropyParams {
            n_rows: u32_of(n_rows, "rows")?,
            vocab: u32_of(vocab, "vocab")?,
            ..Default::default()
        };
        ctx.dispatch(enc, &CROSS_ENTROPY, &p, &[logits, targets, loss], groups_1d(p.n_rows))
    }

    /// Fused softmax cross-entropy forward and backward: writes loss[t] and replaces the logits
    /// in place with grad_scale * (softmax - onehot); rows with target u32::MAX get zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        loss: &wgpu::Buffer,
        n_rows: usize,
        vocab: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let p =
            CrossEntropyParams { n_rows: u32_of(n_rows, "rows")?, vocab: u32_of(vocab, "vocab")?, grad_scale, _pad: 0 };
        ctx.dispatch(enc, &CROSS_ENTROPY_BACKWARD, &p, &[logits, targets, loss], groups_1d(p.n_rows))
    }

    /// The weight operand of a linear layer.
    #[derive(Debug, Clone, Copy)]
    pub enum Weight<'a> {
        /// f32 (N, K).
        Dense(&'a wgpu::Buffer),
        /// f32 (N, K) starting at element `offset` of a larger buffer (LoRA's flat buffer).
        DenseAt(&'a wgpu::Buffer, usize),
        /// f16 (N, K) as packed pairs, lower half first; K must be even.
        F16(&'a wgpu::Buffer),
        /// Packed NF4 (N*K/8 words) and its absmax (one per block).
        Nf4 { packed: &'a wgpu::Buffer, absmax: &'a wgpu::Buffer, block_size: usize },
    }

    /// Output placement and epilogue: y is (rows, stride); a call writes columns
    /// [col_offset, col_offset + cols) with `alpha * result`, added to y when `accumulate`.
    #[derive(Debug, Clone, Copy)]
    pub struct OutCols {
        pub stride: usize,
        pub col_offset: usize,
        pub alpha: f32,
        pub accumulate: bool,
    }

    impl OutCols {
        /// Overwrite columns [col_offset, ..) of a (rows, stride) output, alpha 1.
        pub fn at(stride: usize, col_offset: usize) -> Self {
            OutCols { stride, col_offset, alpha: 1.0, accumulate: false }
        }
        /// A whole contiguous (rows, cols) output.
        pub fn whole(cols: usize) -> Self {
            Self::at(cols, 0)
        }
        /// Multiplies the result by `alpha`.
        pub fn scaled(self, alpha: f32) -> Self {
            OutCols { alpha, ..self }
        }
        /// Adds the result to what y holds.
        pub fn accumulated(self) -> Self {
            OutCols { accumulate: true, ..self }
        }
    }

    /// Rows of dy: (rows, stride), of which a call reads columns [col_offset, col_offset + N).
    #[derive(Debug, Clone, Copy)]
    pub struct DyCols<'a> {
        pub buf: &'a wgpu::Buffer,
        pub stride: usize,
        pub col_offset: usize,
    }

    impl<'a> DyCols<'a> {
        /// A whole contiguous (rows, cols) gradient.
        pub fn whole(buf: &'a wgpu::Buffer, cols: usize) -> Self {
            DyCols { buf, stride: cols, col_offset: 0 }
        }
    }

    fn matmul_params(m: usize, n: usize, k: usize, out: OutCols) -> Result<MatmulParams> {
        Ok(MatmulParams {
            m: u32_of(m, "rows")?,
            n: u32_of(n, "out features")?,
            k: u32_of(k, "in features")?,
            has_bias: 0,
            y_stride: u32_of(out.stride, "stride")?,
            y_col_offset: u32_of(out.col_offset, "column")?,
            block_size: 0,
            accumulate: out.accumulate as u32,
            alpha: out.alpha,
            w_offset: 0,
            dy_stride: 0,
            dy_col_offset: 0,
            split_k: 0,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        })
    }

    fn check_nf4(k: usize, block_size: usize) -> Result<()> {
        if !k.is_multiple_of(8) || !block_size.is_multiple_of(8) {
            return Err(Error::invalid(
                "NF4 matmul",
                format!("needs K % 8 == 0 and block size % 8 == 0 (K {k}, block {block_size})"),
            ));
        }
        Ok(())
    }

    fn check_f16(k: usize) -> Result<()> {
        if !k.is_multiple_of(2) {
            return Err(Error::invalid("f16 matmul", format!("needs an even K (K {k})")));
        }
        Ok(())
    }

    /// y[m, col_offset + n] (+)= alpha * x[m, :] . w[n, :] (+ bias[n]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: Weight<'_>,
        bias: Option<&wgpu::Buffer>,
        y: &wgpu::Buffer,
        m: usize,
        n: usize,
        k: usize,
        out: OutCols,
    ) -> Result<()> {
        let mut p = matmul_params(m, n, k, out)?;
        p.has_bias = bias.is_some() as u32;
        // The bias binding must exist even when unused; x serves as a harmless dummy.
        let b = bias.unwrap_or(x);
        let (row, tiled, simd, simd_ok, buffers): ([&'static Shader; 2], _, _, bool, Vec<&wgpu::Buffer>) = match w {
            Weight::Dense(w) => ([&MATVEC, &MATVEC_SIMD8], &MATMUL, &MATMUL_SIMD8, true, vec![x, w, b, y]),
            Weight::DenseAt(w, offset) => {
                p.w_offset = u32_of(offset, "weight offset")?;
                ([&MATVEC, &MATVEC_SIMD8], &MATMUL, &MATMUL_SIMD8, offset.is_multiple_of(4), vec![x, w, b, y])
            }
            Weight::F16(w) => {
                check_f16(k)?;
                ([&MATVEC_F16, &MATVEC_F16_SIMD8], &MATMUL_F16, &MATMUL_F16_SIMD8, true, vec![x, w, b, y])
            }
            Weight::Nf4 { packed, absmax, block_size } => {
                check_nf4(k, block_size)?;
                p.block_size = u32_of(block_size, "block size")?;
                let bufs = vec![x, packed, absmax, b, y];
                ([&MATVEC_NF4, &MATVEC_NF4_SIMD8], &MATMUL_NF4, &MATMUL_NF4_SIMD8, true, bufs)
            }
        };
        // One row (decoding) splits the reduction over a workgroup (matvec); more rows use the
        // tiled kernels. CPU rasterizers get register-tiled variants of both where K allows.
        let simd_ok = simd_ok && k.is_multiple_of(8);
        match m {
            1 if ctx.report.simd8_kernels && simd_ok => {
                ctx.dispatch(enc, row[1], &p, &buffers, [p.n.div_ceil(32), 1, 1])
            }
            1 => ctx.dispatch(enc, row[0], &p, &buffers, [p.n.div_ceil(8), 1, 1]),
            _ => run_many_rows(ctx, enc, many_rows(ctx, tiled, simd, simd_ok, (p.m, p.n, p.k)), p, &buffers),
        }
    }

    /// A many-row matmul's kernel and output shape: (rows, cols) outputs over a reduction of
    /// length `red`. See [`many_rows`] and [`run_many_rows`].
    struct ManyRows {
        shader: &'static Shader,
        groups: [u32; 3],
        tiled: bool,
        rows: u32,
        cols: u32,
        red: u32,
    }

    /// The kernel for a many-row matmul: the register-tiled variant (32 x 32 outputs per
    /// workgroup) on adapters that want it when `simd_ok` says the shape suits it, else the
    /// tiled one (64 x 64).
    fn many_rows(
        ctx: &GpuContext,
        tiled: &'static Shader,
        simd: &'static Shader,
        simd_ok: bool,
        (rows, cols, red): (u32, u32, u32),
    ) -> ManyRows {
        if ctx.report.simd8_kernels && simd_ok {
            ManyRows { shader: simd, groups: [cols.div_ceil(32), rows.div_ceil(32), 1], tiled: false, rows, cols, red }
        } else {
            ManyRows { shader: tiled, groups: [cols.div_ceil(64), rows.div_ceil(64), 1], tiled: true, rows, cols, red }
        }
    }

    /// Below this many workgroups a tiled matmul splits its reduction (a large GPU runs a few
    /// hundred such workgroups at once).
    const SPLIT_TARGET_GROUPS: u32 = 512;
    /// The shortest reduction slice a split gives one workgroup (8 steps of BK = 16).
    const MIN_SLICE: u32 = 128;
    const MAX_SPLITS: u32 = 64;

    /// How many slices a tiled matmul's reduction is split into, and the length of each (a
    /// multiple of BK = 16): enough workgroups for a large GPU, slices of at least
    /// [`MIN_SLICE`]. (1, 0) means no split.
    pub fn split_of(groups: u32, red: u32) -> (u32, u32) {
        if groups >= SPLIT_TARGET_GROUPS || red < 2 * MIN_SLICE {
            return (1, 0);
        }
        let want = SPLIT_TARGET_GROUPS.div_ceil(groups).min(red / MIN_SLICE).min(MAX_SPLITS);
        let slice = red.div_ceil(want).next_multiple_of(16);
        let splits = red.div_ceil(slice);
        if splits < 2 { (1, 0) } else { (splits, slice) }
    }

    /// Records a many-row matmul. `buffers` are the kernel's bindings after the params; the
    /// last is the output and the one before it the bias binding (a dummy when unused). A tiled
    /// kernel with a small grid and a long reduction runs in two dispatches: slices of the
    /// reduction into the context's scratch buffer, then matmul_split_reduce.wgsl.
    fn run_many_rows(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        k: ManyRows,
        p: MatmulParams,
        buffers: &[&wgpu::Buffer],
    ) -> Result<()> {
        let (splits, slice) = if k.tiled { split_of(k.groups[0] * k.groups[1], k.red) } else { (1, 0) };
        if splits < 2 {
            return ctx.dispatch(enc, k.shader, &p, buffers, k.groups);
        }
        let (rows, cols) = (k.rows as usize, k.cols as usize);
        let scratch = ctx.split_scratch(splits as usize * rows * cols)?;
        let partial = MatmulParams {
            split_k: slice,
            alpha: 1.0,
            has_bias: 0,
            accumulate: 0,
            y_stride: k.cols,
            y_col_offset: 0,
            ..p
        };
        let n = buffers.len();
        let mut bound = buffers.to_vec();
        bound[n - 1] = &scratch;
        ctx.dispatch(enc, k.shader, &partial, &bound, [k.groups[0], k.groups[1], splits])?;
        let reduce = MatmulParams { m: k.rows, n: k.cols, k: splits, ..p };
        let quads = u32_of(rows * cols.div_ceil(4), "outputs")?;
        let reduce_buffers = [&scratch, buffers[n - 2], buffers[n - 1]];
        let groups = groups_1d(quads.div_ceil(64));
        ctx.record(enc, &MATMUL_SPLIT_REDUCE, bytemuck::bytes_of(&reduce), &reduce_buffers, groups, false)
    }

    /// Input gradient of a linear layer: dx[m, col_offset + k] (+)= alpha * dy[m, :N] . w[:, k],
    /// w (N, K). The weight itself gets no gradient here (frozen base, or see
    /// [`matmul_backward_w`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        dy: DyCols<'_>,
        w: Weight<'_>,
        dx: &wgpu::Buffer,
        m: usize,
        n: usize,
        k: usize,
        out: OutCols,
    ) -> Result<()> {
        let mut p = matmul_params(m, n, k, out)?;
        p.dy_stride = u32_of(dy.stride, "dy stride")?;
        p.dy_col_offset = u32_of(dy.col_offset, "dy column")?;
        let aligned = [n, k, dy.stride, dy.col_offset].iter().all(|v| v.is_multiple_of(4));
        let g = dy.buf;
        let (tiled, simd, simd_ok, buffers): (_, _, bool, Vec<&wgpu::Buffer>) = match w {
            Weight::Dense(w) => (&MATMUL_BACKWARD, &MATMUL_BACKWARD_SIMD8, true, vec![g, w, g, dx]),
            Weight::DenseAt(w, offset) => {
                p.w_offset = u32_of(offset, "weight offset")?;
                (&MATMUL_BACKWARD, &MATMUL_BACKWARD_SIMD8, offset.is_multiple_of(4), vec![g, w, g, dx])
            }
            Weight::F16(w) => {
                check_f16(k)?;
                (&MATMUL_F16_BACKWARD, &MATMUL_F16_BACKWARD_SIMD8, true, vec![g, w, g, dx])
            }
            Weight::Nf4 { packed, absmax, block_size } => {
                check_nf4(k, block_size)?;
                p.block_size = u32_of(block_size, "block size")?;
                (&MATMUL_NF4_BACKWARD, &MATMUL_NF4_BACKWARD_SIMD8, true, vec![g, packed, absmax, g, dx])
            }
        };
        let kernel = many_rows(ctx, tiled, simd, aligned && simd_ok, (p.m, p.k, p.n));
        run_many_rows(ctx, enc, kernel, p, &buffers)
    }

    /// Weight gradient of a dense linear layer, into a flat buffer:
    /// dw[offset + n*K + k] (+)= alpha * sum_m dy[m, n] * x[m, k]; dy (M, N), x (M, K) contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward_w(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        dy: &wgpu::Buffer,
        x: &wgpu::Buffer,
        dw: &wgpu::Buffer,
        dw_offset: usize,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        let out = OutCols { stride: k, col_offset: dw_offset, alpha, accumulate };
        let p = matmul_params(m, n, k, out)?;
        let aligned = n.is_multiple_of(4) && k.is_multiple_of(4);
        let kernel = many_rows(ctx, &MATMUL_BACKWARD_W, &MATMUL_BACKWARD_W_SIMD8, aligned, (p.n, p.k, p.m));
        run_many_rows(ctx, enc, kernel, p, &[dy, x, dy, dw])
    }

    /// Shapes of an attention call.
    #[derive(Debug, Clone, Copy)]
    pub struct AttentionShape {
        pub n_tokens: usize,
        pub n_heads: usize,
        pub n_kv_heads: usize,
        pub head_dim: usize,
        pub pos_offset: usize,
    }

    fn attention_params(s: AttentionShape) -> Result<AttentionParams> {
        if s.head_dim > 256 || s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(Error::invalid(
                "attention",
                format!("unsupported heads {}/{} or head_dim {}", s.n_heads, s.n_kv_heads, s.head_dim),
            ));
        }
        Ok(AttentionParams {
            n_tokens: u32_of(s.n_tokens, "tokens")?,
            n_heads: u32_of(s.n_heads, "heads")?,
            n_kv_heads: u32_of(s.n_kv_heads, "kv heads")?,
            head_dim: u32_of(s.head_dim, "head_dim")?,
            pos_offset: u32_of(s.pos_offset, "position")?,
            kv_stride: u32_of(s.n_kv_heads * s.head_dim, "kv stride")?,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            _pad: 0,
        })
    }

    /// Causal GQA attention of q (T, H*hd) over keys/values (positions, Hkv*hd): query t sits
    /// at position pos_offset + t and sees keys key_start[t] ..= pos_offset + t (key_start must
    /// not exceed that). Writes out (T, H*hd) and the softmax statistics `stats` (T*H pairs)
    /// that the backward pass needs.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        key_start: &wgpu::Buffer,
        out: &wgpu::Buffer,
        stats: &wgpu::Buffer,
        s: AttentionShape,
    ) -> Result<()> {
        let p = attention_params(s)?;
        let buffers = [q, k, v, key_start, out, stats];
        match attention_simd8(ctx, s, &ATTENTION_SIMD8, &ATTENTION_SIMD8_HD64) {
            Some(shader) => ctx.dispatch(enc, shader, &p, &buffers, [p.n_tokens.div_ceil(8), p.n_heads, 1]),
            None => ctx.dispatch(enc, &ATTENTION, &p, &buffers, [p.n_tokens, p.n_heads, 1]),
        }
    }

    /// The register-tiled attention variant for CPU rasterizers (8 queries per workgroup) where
    /// the adapter wants it and the head fits: head_dim a multiple of 4 up to 128, the smaller
    /// unrolling up to 64.
    fn attention_simd8(
        ctx: &GpuContext,
        s: AttentionShape,
        full: &'static Shader,
        hd64: &'static Shader,
    ) -> Option<&'static Shader> {
        let fits = s.head_dim.is_multiple_of(4) && s.head_dim <= 128;
        match ctx.report.simd8_kernels && fits {
            true if s.head_dim <= 64 => Some(hd64),
            true => Some(full),
            false => None,
        }
    }

    /// The buffers of an attention backward call: the forward's inputs and outputs, the
    /// output gradient, and where the input gradients go (all overwritten).
    #[derive(Debug, Clone, Copy)]
    pub struct AttentionGrads<'a> {
        pub q: &'a wgpu::Buffer,
        pub k: &'a wgpu::Buffer,
        pub v: &'a wgpu::Buffer,
        pub key_start: &'a wgpu::Buffer,
        pub out: &'a wgpu::Buffer,
        pub stats: &'a wgpu::Buffer,
        pub dout: &'a wgpu::Buffer,
        pub dq: &'a wgpu::Buffer,
        pub dk: &'a wgpu::Buffer,
        pub dv: &'a wgpu::Buffer,
    }

    /// Backward of [`attention_forward`] for a training batch (pos_offset 0, keys = the batch):
    /// two passes, queries then keys/values, so that no gradient needs atomics.
    pub fn attention_backward(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        b: AttentionGrads<'_>,
        s: AttentionShape,
    ) -> Result<()> {
        if s.pos_offset != 0 {
            return Err(Error::invalid("attention backward", "runs over a whole batch (position offset 0)"));
        }
        let p = attention_params(s)?;
        let q_buffers = [b.q, b.k, b.v, b.key_start, b.out, b.dout, b.stats, b.dq];
        let kv_buffers = [b.q, b.k, b.v, b.key_start, b.dout, b.stats, b.dk, b.dv];
        let q_pass = attention_simd8(ctx, s, &ATTENTION_BACKWARD_Q_SIMD8, &ATTENTION_BACKWARD_Q_SIMD8_HD64);
        let kv_pass = attention_simd8(ctx, s, &ATTENTION_BACKWARD_KV_SIMD8, &ATTENTION_BACKWARD_KV_SIMD8_HD64);
        match (q_pass, kv_pass) {
            (Some(qs), Some(kvs)) => {
                ctx.dispatch(enc, qs, &p, &q_buffers, [p.n_tokens.div_ceil(8), p.n_heads, 1])?;
                ctx.dispatch(enc, kvs, &p, &kv_buffers, [p.n_tokens.div_ceil(8), p.n_kv_heads, 1])
            }
            _ => {
                ctx.dispatch(enc, &ATTENTION_BACKWARD_Q, &p, &q_buffers, [p.n_tokens, p.n_heads, 1])?;
                ctx.dispatch(enc, &ATTENTION_BACKWARD_KV, &p, &kv_buffers, [p.n_tokens, p.n_kv_heads, 1])
            }
        }
    }

    /// AdamW hyper-parameters for one step.
    #[derive(Debug, Clone, Copy)]
    pub struct AdamwStep {
        pub lr: f32,
        pub beta1: f32,
        pub beta2: f32,
        pub eps: f32,
        pub weight_decay: f32,
        /// 1-based step number, for the bias corrections.
        pub step: u32,
        /// Multiplies every gradient first (loss scaling).
        pub grad_scale: f32,
        /// Clip the global gradient norm to this (0: no clipping).
        pub max_grad_norm: f32,
    }

    /// Workgroups of the first grad-norm pass for n values (its partials buffer holds this many).
    pub fn grad_norm_groups(n: usize) -> usize {
        n.div_ceil(256).clamp(1, 256)
    }

    /// norm[0] = the L2 norm of x (n values), through `partials` (grad_norm_groups(n) floats).
    pub fn grad_norm(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        partials: &wgpu::Buffer,
        norm: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        let g = grad_norm_groups(n);
        let p1 = GradNormParams { n: u32_of(n, "parameters")?, final_pass: 0, n_groups: g as u32, _pad: 0 };
        ctx.dispatch(enc, &GRAD_NORM, &p1, &[x, partials], [g as u32, 1, 1])?;
        let p2 = GradNormParams { n: g as u32, final_pass: 1, n_groups: 1, _pad: 0 };
        ctx.dispatch(enc, &GRAD_NORM, &p2, &[partials, norm], [1, 1, 1])
    }

    /// One AdamW step over flat `param`, `grad`, `m` and `v` buffers of `n` values, clipped by
    /// the global gradient norm in `norm[0]` (see [`grad_norm`]); a non-finite norm skips it.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        param: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        m: &wgpu::Buffer,
        v: &wgpu::Buffer,
        norm: &wgpu::Buffer,
        n: usize,
        s: AdamwStep,
    ) -> Result<()> {
        if s.step == 0 {
            return Err(Error::invalid("AdamW step", "steps count from 1"));
        }
        let (c1, c2) = crate::reference::adamw_bias_corrections(s.beta1, s.beta2, s.step);
        let p = AdamwParams {
            n: u32_of(n, "parameters")?,
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            bias_c1: c1,
            bias_c2: c2,
            grad_scale: s.grad_scale,
            max_grad_norm: s.max_grad_norm,
            ..Default::default()
        };
        ctx.dispatch(enc, &ADAMW, &p, &[param, grad, m, v, norm], groups_1d(p.n.div_ceil(256)))
    }
}
