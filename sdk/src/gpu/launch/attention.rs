//! Causal grouped-query attention, forward and backward.

use super::*;
use crate::gpu::KernelFamily;

/// Shapes of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Queries (tokens of this call).
    pub n_tokens: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key and value heads; `n_heads` is a multiple of it.
    pub n_kv_heads: usize,
    /// Width of a head (at most 256).
    pub head_dim: usize,
    /// Position of the first query: keys before it come from the cache (0 for a training batch).
    pub pos_offset: usize,
    /// What q . k is multiplied by before the softmax: 1 / sqrt(head_dim), or the model's own
    /// (Gemma's 1 / sqrt(query_pre_attn_scalar)).
    pub scale: f32,
    /// Gemma 2's soft cap of the scaled scores: each becomes cap · tanh(score / cap) before the
    /// softmax (`attn_logit_softcapping`); `None` leaves them as they are.
    pub softcap: Option<f32>,
}

fn attention_params(s: AttentionShape) -> Result<AttentionParams> {
    if s.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return Err(Error::invalid("attention", format!("soft cap {:?} (expected a positive number)", s.softcap)));
    }
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
        scale: s.scale,
        softcap: s.softcap.unwrap_or(0.0),
    })
}

/// Causal GQA attention of q (T, H*hd) over keys/values (positions, Hkv*hd): query t sits
/// at position pos_offset + t and sees keys `key_start[t] ..= pos_offset + t` (key_start must
/// not exceed that). Writes out (T, H*hd) and the softmax statistics `stats` (T*H pairs)
/// that the backward pass needs.
pub fn attention_forward(ctx: &GpuContext, enc: &mut Encoder, b: AttentionIo<'_>, s: AttentionShape) -> Result<()> {
    let AttentionIo { q, k, v, key_start, out, stats } = b;
    let p = attention_params(s)?;
    let buffers = [q, k, v, key_start, out, stats];
    // Blocks of 16 queries where the family has them and the head fits; a decoding step's one
    // query would leave 15 of 16 idle.
    let blocked = ctx.report.kernels.attention == KernelFamily::Tile128 && s.head_dim <= 128 && s.n_tokens > 1;
    let (shader, groups) = match attention_simd8(ctx, s, &ATTENTION_SIMD8, &ATTENTION_SIMD8_HD64) {
        Some(shader) => (shader, [p.n_tokens.div_ceil(8), p.n_heads, 1]),
        None if blocked => (&ATTENTION_T128, [p.n_tokens.div_ceil(16), p.n_heads, 1]),
        None => (&ATTENTION, [p.n_tokens, p.n_heads, 1]),
    };
    ctx.dispatch_costed(enc, Dispatch { shader, buffers: &buffers, groups }, &p, attention_cost(s, 4.0, 2.0))
}

/// What an attention pass computes and moves, counting every causal (query, key) pair (packed
/// batches see fewer): `per_pair` multiply-adds of a head's width per pair and head, and
/// `tensors` query-sized tensors read or written besides the keys and values.
fn attention_cost(s: AttentionShape, per_pair: f64, tensors: f64) -> Cost {
    let (t, pos) = (s.n_tokens as f64, s.pos_offset as f64);
    let pairs = t * pos + t * (t + 1.0) / 2.0;
    let hd = s.head_dim as f64;
    let keys = (s.pos_offset + s.n_tokens) as f64 * (s.n_kv_heads as f64 * hd) * 4.0 * 2.0;
    Cost { flops: per_pair * hd * pairs * s.n_heads as f64, bytes: keys + tensors * t * s.n_heads as f64 * hd * 4.0 }
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
    match ctx.report.kernels.attention == KernelFamily::Simd8 && fits {
        true if s.head_dim <= 64 => Some(hd64),
        true => Some(full),
        false => None,
    }
}

/// The buffers of an attention call: queries, keys and values, each query's first visible key,
/// and the output with its softmax statistics.
#[derive(Debug, Clone, Copy)]
pub struct AttentionIo<'a> {
    /// (n_tokens, n_heads, head_dim) queries, RoPE applied.
    pub q: &'a wgpu::Buffer,
    /// Keys of every visible position, `n_kv_heads` a position, RoPE applied.
    pub k: &'a wgpu::Buffer,
    /// Values of every visible position, `n_kv_heads` a position.
    pub v: &'a wgpu::Buffer,
    /// (n_tokens) u32: the first key each query may see (its sample's first token in a packed
    /// batch).
    pub key_start: &'a wgpu::Buffer,
    /// (n_tokens, n_heads, head_dim) output.
    pub out: &'a wgpu::Buffer,
    /// (n_tokens, n_heads) pairs: the softmax's log-sum-exp per query and head (then a 0),
    /// which the backward pass reuses.
    pub stats: &'a wgpu::Buffer,
}

/// The buffers of an attention backward call: the forward's inputs and outputs, the
/// output gradient, and where the input gradients go (all overwritten).
#[derive(Debug, Clone, Copy)]
pub struct AttentionGrads<'a> {
    /// The forward call's buffers, as it left them.
    pub fwd: AttentionIo<'a>,
    /// The gradient of the output, shaped like it.
    pub dout: &'a wgpu::Buffer,
    /// The queries' gradient, shaped like them.
    pub dq: &'a wgpu::Buffer,
    /// The keys' gradient, shaped like them.
    pub dk: &'a wgpu::Buffer,
    /// The values' gradient, shaped like them.
    pub dv: &'a wgpu::Buffer,
}

/// Backward of [`attention_forward`] for a training batch (pos_offset 0, keys = the batch):
/// two passes, queries then keys/values, so that no gradient needs atomics.
pub fn attention_backward(ctx: &GpuContext, enc: &mut Encoder, b: AttentionGrads<'_>, s: AttentionShape) -> Result<()> {
    if s.pos_offset != 0 {
        return Err(Error::invalid("attention backward", "runs over a whole batch (position offset 0)"));
    }
    let p = attention_params(s)?;
    let AttentionIo { q, k, v, key_start, out, stats } = b.fwd;
    let q_buffers = [q, k, v, key_start, out, b.dout, stats, b.dq];
    let kv_buffers = [q, k, v, key_start, b.dout, stats, b.dk, b.dv];
    let q_pass = attention_simd8(ctx, s, &ATTENTION_BACKWARD_Q_SIMD8, &ATTENTION_BACKWARD_Q_SIMD8_HD64);
    let kv_pass = attention_simd8(ctx, s, &ATTENTION_BACKWARD_KV_SIMD8, &ATTENTION_BACKWARD_KV_SIMD8_HD64);
    let blocked = ctx.report.kernels.attention == KernelFamily::Tile128 && s.head_dim <= 128;
    let ((qs, q_groups), (kvs, kv_groups)) = match (q_pass, kv_pass) {
        (Some(qs), Some(kvs)) => {
            ((qs, [p.n_tokens.div_ceil(8), p.n_heads, 1]), (kvs, [p.n_tokens.div_ceil(8), p.n_kv_heads, 1]))
        }
        _ if blocked => (
            (&ATTENTION_BACKWARD_Q_T128, [p.n_tokens.div_ceil(16), p.n_heads, 1]),
            (&ATTENTION_BACKWARD_KV_T128, [p.n_tokens.div_ceil(16), p.n_kv_heads, 1]),
        ),
        _ => (
            (&ATTENTION_BACKWARD_Q, [p.n_tokens, p.n_heads, 1]),
            (&ATTENTION_BACKWARD_KV, [p.n_tokens, p.n_kv_heads, 1]),
        ),
    };
    // Queries: scores again, dP = dO V and dQ = dS K (6 per pair); keys and values: scores,
    // dP, dV = P^T dO and dK = dS^T Q (8 per pair), with dK and dV written besides.
    let q_pass = Dispatch { shader: qs, buffers: &q_buffers, groups: q_groups };
    ctx.dispatch_costed(enc, q_pass, &p, attention_cost(s, 6.0, 4.0))?;
    let kv_pass = Dispatch { shader: kvs, buffers: &kv_buffers, groups: kv_groups };
    ctx.dispatch_costed(enc, kv_pass, &p, attention_cost(s, 8.0, 2.0))
}
