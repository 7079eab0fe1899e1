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
    /// Where the sequence's position 0 lies in the key and value buffers: 0, or a cache's slot
    /// in a pool of caches ([`crate::model::llama::Model::new_caches_for`]), whose queries'
    /// first keys (`key_start`) are then at least this.
    pub key_base: usize,
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
        pos_offset: u32_of(s.key_base + s.pos_offset, "position")?,
        kv_stride: u32_of(s.n_kv_heads * s.head_dim, "kv stride")?,
        scale: s.scale,
        softcap: s.softcap.unwrap_or(0.0),
        ..Default::default()
    })
}

/// Keys per workgroup in split-key decoding (a multiple of the kernel's 64-key tiles), until
/// there would be more than [`MAX_KEY_SPLITS`] slices.
pub const SPLIT_KEYS: usize = 256;
/// The most slices per (query, head): past 16,384 keys the slices grow instead, which bounds
/// the scratch at 64 partials of a head for each of fewer than 256 (query, head) pairs.
pub const MAX_KEY_SPLITS: usize = 64;

/// How many slices a pass of the plain kernel splits its keys into: one (no split) unless its
/// grid of (query, head) workgroups is smaller than the context's threshold
/// ([`crate::gpu::context::SPLIT_KEYS_BELOW`] by default) and the keys span more than
/// [`SPLIT_KEYS`], as when decoding over a long cache.
pub fn key_splits(ctx: &GpuContext, s: AttentionShape) -> usize {
    key_slices(ctx, s).0
}

/// The slices of split-key attention and the keys of each (a multiple of 64): [`SPLIT_KEYS`]
/// keys a slice, more past [`MAX_KEY_SPLITS`] slices.
fn key_slices(ctx: &GpuContext, s: AttentionShape) -> (usize, usize) {
    slices_of(ctx, s.n_tokens * s.n_heads, s.pos_offset + s.n_tokens)
}

/// [`key_slices`] of a grid of `pairs` (query, head) workgroups whose queries see at most
/// `keys` keys each; a query's slices count from its first key.
fn slices_of(ctx: &GpuContext, pairs: usize, keys: usize) -> (usize, usize) {
    if pairs >= ctx.split_keys_below || keys <= SPLIT_KEYS {
        return (1, keys);
    }
    let per_slice = keys.div_ceil(MAX_KEY_SPLITS).next_multiple_of(64).max(SPLIT_KEYS);
    (keys.div_ceil(per_slice), per_slice)
}

/// Causal GQA attention of q (T, H*hd) over keys/values (positions, Hkv*hd): query t sits
/// at position key_base + pos_offset + t of them and sees keys `key_start[t] ..=` that
/// (key_start must not exceed it, nor fall below key_base). Writes out (T, H*hd) and the softmax statistics `stats` (T*H pairs)
/// that the backward pass needs.
pub fn attention_forward(ctx: &GpuContext, enc: &mut Encoder, b: AttentionIo<'_>, s: AttentionShape) -> Result<()> {
    let AttentionIo { q, k, v, key_start, out, stats } = b;
    let p = attention_params(s)?;
    let buffers = [q, k, v, key_start, out, stats];
    // Blocks of 64 queries where the family has them (any head [`attention_params`] takes, up to
    // 256 dims, 128 at a time); a decoding step's one query would leave 63 of 64 idle. Rows are
    // reduced with subgroup shuffles where the adapter has them.
    let blocked = ctx.report.kernels.attention == KernelFamily::Tile128 && s.n_tokens > 1;
    let slices = key_slices(ctx, s);
    let (shader, groups) =
        match attention_simd8(ctx, s, [&ATTENTION_SIMD8_HD64, &ATTENTION_SIMD8, &ATTENTION_SIMD8_HD256]) {
            Some(shader) => (shader, [p.n_tokens.div_ceil(8), p.n_heads, 1]),
            None if blocked => {
                let shader = if ctx.report.subgroups { &ATTENTION_T128 } else { &ATTENTION_T128_SHARED };
                (shader, [p.n_tokens.div_ceil(64), p.n_heads, 1])
            }
            None if slices.0 > 1 => {
                return split_key_attention(ctx, enc, b, (s, p), slices, attention_cost(s, 4.0, 1.0));
            }
            None => (&ATTENTION, [p.n_tokens, p.n_heads, 1]),
        };
    ctx.dispatch_costed(
        enc,
        Dispatch { shader, buffers: &buffers, groups, constants: &[] },
        &p,
        attention_cost(s, 4.0, 2.0),
    )
}

/// Attention of rows that are each one query of its own sequence (decoding several sequences
/// at once), whose keys and values all lie in `b.k` and `b.v`, as the caches of one pool do
/// ([`crate::model::llama::Model::new_caches_for`]). `b.key_start` holds (first, end) for each
/// row: row i of `b.q` attends to keys first .. end - 1 into row i of `b.out` (and `b.stats`),
/// and a row with first = end is left as it is, so that a pass over some rows writes only
/// theirs. `s.n_tokens` counts the rows, and `s.pos_offset` and `s.key_base` are not read;
/// `keys` are the most keys a row sees and those all rows see. One dispatch for every row:
/// simd8's kernel where it takes the head, else the plain kernel (two dispatches where it
/// splits the keys, [`key_splits`]).
pub fn attention_rows_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    b: AttentionIo<'_>,
    s: AttentionShape,
    (most, all): (usize, usize),
) -> Result<()> {
    let p = AttentionParams { key_ends: 1, pos_offset: 0, ..attention_params(s)? };
    let hd = s.head_dim as f64;
    let queries = (s.n_tokens * s.n_heads) as f64 * hd * 4.0;
    let cost = Cost {
        flops: 4.0 * hd * (all * s.n_heads) as f64,
        bytes: all as f64 * (s.n_kv_heads as f64 * hd) * 4.0 * 2.0 + 2.0 * queries,
    };
    let AttentionIo { q, k, v, key_start, out, stats } = b;
    let buffers = [q, k, v, key_start, out, stats];
    // simd8's lanes walk every key that any of their 8 rows sees, as many as the rows' own
    // dispatches would walk one after another.
    let (shader, groups) =
        match attention_simd8(ctx, s, [&ATTENTION_SIMD8_HD64, &ATTENTION_SIMD8, &ATTENTION_SIMD8_HD256]) {
            Some(shader) => (shader, [p.n_tokens.div_ceil(8), p.n_heads, 1]),
            None => {
                let slices = slices_of(ctx, s.n_tokens * s.n_heads, most);
                if slices.0 > 1 {
                    return split_key_attention(ctx, enc, b, (s, p), slices, cost);
                }
                (&ATTENTION, [p.n_tokens, p.n_heads, 1])
            }
        };
    ctx.dispatch_costed(enc, Dispatch { shader, buffers: &buffers, groups, constants: &[] }, &p, cost)
}

/// Where [`kv_write`] puts a pass's rows in the cache.
#[derive(Debug, Clone, Copy)]
pub enum KvAt<'a> {
    /// Row i at position first + i (one sequence's tokens).
    From(usize),
    /// Row i at the end of its key range less one, in a table of (first, end) pairs as
    /// [`attention_rows_forward`] reads; a row of no keys is not written.
    RangeEnds(&'a wgpu::Buffer),
}

/// A [`kv_write`] call: `n_rows` rows of `width` floats of new keys `k` and values `v`, into a
/// KV cache's layer buffers `k_cache` and `v_cache` at `at`.
#[derive(Debug, Clone, Copy)]
pub struct KvWrite<'a> {
    /// (n_rows, width) new keys.
    pub k: &'a wgpu::Buffer,
    /// (n_rows, width) new values.
    pub v: &'a wgpu::Buffer,
    /// (positions, width) cached keys.
    pub k_cache: &'a wgpu::Buffer,
    /// (positions, width) cached values.
    pub v_cache: &'a wgpu::Buffer,
    /// Rows to write.
    pub n_rows: usize,
    /// Floats of a position: key heads times head width.
    pub width: usize,
    /// Where the rows go.
    pub at: KvAt<'a>,
}

/// Writes a pass's keys and values into a KV cache in one dispatch, where two copies would end
/// the compute pass (a decoded token's whole forward pass then stays one pass).
pub fn kv_write(ctx: &GpuContext, enc: &mut Encoder, w: KvWrite<'_>) -> Result<()> {
    let (first, ranges, table) = match w.at {
        KvAt::From(first) => (first, 0, w.k),
        KvAt::RangeEnds(table) => (0, 1, table),
    };
    let p = KvWriteParams {
        n_rows: u32_of(w.n_rows, "rows")?,
        width: u32_of(w.width, "key width")?,
        first: u32_of(first, "position")?,
        ranges,
    };
    let cost = Cost { flops: 0.0, bytes: 16.0 * (w.n_rows * w.width) as f64 };
    let buffers = [w.k, w.v, table, w.k_cache, w.v_cache];
    let d = Dispatch { shader: &KV_WRITE, buffers: &buffers, groups: [p.n_rows, 1, 1], constants: &[] };
    ctx.dispatch_costed(enc, d, &p, cost)
}

/// Split-key decoding (flash decoding): a few queries over many keys, as when decoding over a
/// long cache, would give the plain kernel one workgroup per (query, head), each walking every
/// key. Instead each of `splits` workgroups per (query, head) takes `per_slice` keys
/// ([`key_slices`]) and writes its partial softmax into the context's scratch buffer, and
/// `attention_combine.wgsl` adds the partials into `out` and `stats`. `cost`: the unsplit pass's.
fn split_key_attention(
    ctx: &GpuContext,
    enc: &mut Encoder,
    b: AttentionIo<'_>,
    (s, p): (AttentionShape, AttentionParams),
    (splits, per_slice): (usize, usize),
    cost: Cost,
) -> Result<()> {
    let AttentionIo { q, k, v, key_start, out, stats } = b;
    let parts = s.n_tokens * s.n_heads * splits * (s.head_dim + 2);
    let scratch = ctx.split_scratch(parts)?;
    let p = AttentionParams {
        split_keys: u32_of(per_slice, "keys a slice")?,
        n_splits: u32_of(splits, "key slices")?,
        ..p
    };
    let buffers = [q, k, v, key_start, &scratch, stats];
    let groups = [p.n_tokens, p.n_heads, p.n_splits];
    let sliced = Cost { flops: cost.flops, bytes: cost.bytes + 4.0 * parts as f64 };
    ctx.dispatch_costed(enc, Dispatch { shader: &ATTENTION, buffers: &buffers, groups, constants: &[] }, &p, sliced)?;
    let combine_buffers = [&scratch, key_start, out, stats];
    let d = Dispatch {
        shader: &ATTENTION_COMBINE,
        buffers: &combine_buffers,
        groups: [p.n_tokens, p.n_heads, 1],
        constants: &[],
    };
    let query_bytes = 4.0 * (s.n_tokens * s.n_heads * s.head_dim) as f64;
    let combined = Cost { flops: 2.0 * parts as f64, bytes: 4.0 * parts as f64 + query_bytes };
    // The two passes share the scratch buffer, so they run back to back.
    ctx.record(enc, d, bytemuck::bytes_of(&p), combined, false)
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
/// the adapter wants it and the head fits: head_dim a multiple of 4 up to 256, from `variants`
/// (unrolled for heads of 64, 128 and 256 dims) the smallest that holds it.
fn attention_simd8(ctx: &GpuContext, s: AttentionShape, variants: [&'static Shader; 3]) -> Option<&'static Shader> {
    if ctx.report.kernels.attention != KernelFamily::Simd8 || !s.head_dim.is_multiple_of(4) {
        return None;
    }
    [64, 128, 256].iter().zip(variants).find(|&(&dims, _)| s.head_dim <= dims).map(|(_, shader)| shader)
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

/// The most floats of partial dK and dV that the blocked backward pass splits its query heads
/// into (16 MiB): past it, as on long batches, whose grids are large anyway, each workgroup walks
/// the query heads of its group itself.
pub const HEAD_SPLIT_MAX_FLOATS: usize = 1 << 22;

/// Whether the blocked dK/dV pass runs a workgroup per query head, into partials that a second
/// pass adds, instead of per kv head: for GQA whose grid of 64-key blocks by kv heads is smaller
/// than the family's small-grid threshold ([`crate::gpu::Kernels::tile128_min_groups`]), with
/// partials that fit [`HEAD_SPLIT_MAX_FLOATS`].
pub fn head_split(ctx: &GpuContext, s: AttentionShape) -> bool {
    let groups = s.n_tokens.div_ceil(64) * s.n_kv_heads;
    s.n_heads > s.n_kv_heads
        && groups < ctx.report.kernels.tile128_min_groups as usize
        && head_partials(s) <= HEAD_SPLIT_MAX_FLOATS
}

/// Floats of the split dK/dV pass's partials: a share of dK and of dV for every query head.
fn head_partials(s: AttentionShape) -> usize {
    2 * s.n_tokens * s.n_heads * s.head_dim
}

/// The blocked backward kernels (dQ, dK/dV): with rows reduced by subgroup shuffles where the
/// device has subgroup operations, else their `.shared` twins.
fn blocked_backward_shaders(ctx: &GpuContext) -> (&'static Shader, &'static Shader) {
    match ctx.report.subgroups {
        true => (&ATTENTION_BACKWARD_Q_T128, &ATTENTION_BACKWARD_KV_T128),
        false => (&ATTENTION_BACKWARD_Q_T128_SHARED, &ATTENTION_BACKWARD_KV_T128_SHARED),
    }
}

/// The blocked dK/dV pass split by query head ([`head_split`]): `kvs` into the context's
/// scratch, one workgroup per (64 keys, query head), then `attention_backward_kv_reduce.wgsl`
/// adding each group's shares into dk and dv.
fn blocked_kv_split(
    ctx: &GpuContext,
    enc: &mut Encoder,
    b: AttentionGrads<'_>,
    s: AttentionShape,
    p: AttentionParams,
    kvs: &'static Shader,
) -> Result<()> {
    let AttentionIo { q, k, v, key_start, stats, .. } = b.fwd;
    let partials = head_partials(s);
    let scratch = ctx.split_scratch(partials)?;
    let kv_buffers = [q, k, v, key_start, b.dout, stats, &scratch, b.dv];
    let split = AttentionParams { head_split: 1, ..p };
    let groups = [p.n_tokens.div_ceil(64), p.n_heads, 1];
    let kv_pass = Dispatch { shader: kvs, buffers: &kv_buffers, groups, constants: &[] };
    let cost = attention_cost(s, 8.0, 2.0);
    let written = Cost { flops: cost.flops, bytes: cost.bytes + 4.0 * partials as f64 };
    ctx.dispatch_costed(enc, kv_pass, &split, written)?;
    let reduce_buffers = [&scratch, b.dk, b.dv];
    let kv_floats = 2 * s.n_tokens * s.n_kv_heads * s.head_dim;
    let d = Dispatch {
        shader: &ATTENTION_BACKWARD_KV_REDUCE,
        buffers: &reduce_buffers,
        groups: groups_1d(u32_of(kv_floats / 2, "keys")?.div_ceil(64)),
        constants: &[],
    };
    let added = Cost { flops: partials as f64, bytes: 4.0 * (partials + kv_floats) as f64 };
    // The two passes share the scratch buffer, so they run back to back.
    ctx.record(enc, d, bytemuck::bytes_of(&split), added, false)
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
    let q_pass = attention_simd8(
        ctx,
        s,
        [&ATTENTION_BACKWARD_Q_SIMD8_HD64, &ATTENTION_BACKWARD_Q_SIMD8, &ATTENTION_BACKWARD_Q_SIMD8_HD256],
    );
    let kv_pass = attention_simd8(
        ctx,
        s,
        [&ATTENTION_BACKWARD_KV_SIMD8_HD64, &ATTENTION_BACKWARD_KV_SIMD8, &ATTENTION_BACKWARD_KV_SIMD8_HD256],
    );
    let blocked = ctx.report.kernels.attention == KernelFamily::Tile128;
    let ((qs, q_groups), (kvs, kv_groups)) = match (q_pass, kv_pass) {
        (Some(qs), Some(kvs)) => {
            ((qs, [p.n_tokens.div_ceil(8), p.n_heads, 1]), (kvs, [p.n_tokens.div_ceil(8), p.n_kv_heads, 1]))
        }
        _ if blocked => {
            let (qs, kvs) = blocked_backward_shaders(ctx);
            ((qs, [p.n_tokens.div_ceil(64), p.n_heads, 1]), (kvs, [p.n_tokens.div_ceil(64), p.n_kv_heads, 1]))
        }
        _ => (
            (&ATTENTION_BACKWARD_Q, [p.n_tokens, p.n_heads, 1]),
            (&ATTENTION_BACKWARD_KV, [p.n_tokens, p.n_kv_heads, 1]),
        ),
    };
    // Queries: scores again, dP = dO V and dQ = dS K (6 per pair); keys and values: scores,
    // dP, dV = P^T dO and dK = dS^T Q (8 per pair), with dK and dV written besides.
    let q_pass = Dispatch { shader: qs, buffers: &q_buffers, groups: q_groups, constants: &[] };
    ctx.dispatch_costed(enc, q_pass, &p, attention_cost(s, 6.0, 4.0))?;
    if blocked && head_split(ctx, s) {
        return blocked_kv_split(ctx, enc, b, s, p, kvs);
    }
    let kv_pass = Dispatch { shader: kvs, buffers: &kv_buffers, groups: kv_groups, constants: &[] };
    ctx.dispatch_costed(enc, kv_pass, &p, attention_cost(s, 8.0, 2.0))
}
