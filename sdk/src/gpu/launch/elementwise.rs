//! Embedding, RMS norm, RoPE, SwiGLU and GeGLU, residual add, dropout and f16 packing.

use super::*;

/// An embedding lookup over one chunk of a table: rows `row_start .. row_start + row_count`.
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'a> {
    /// (n_tokens) u32 token ids.
    pub ids: &'a wgpu::Buffer,
    /// This chunk's rows of the table.
    pub table: Rows<'a>,
    /// (n_tokens, dim).
    pub out: &'a wgpu::Buffer,
    /// Tokens looked up.
    pub n_tokens: usize,
    /// Width of a row.
    pub dim: usize,
    /// The table row this chunk starts at.
    pub row_start: usize,
    /// Rows in this chunk.
    pub row_count: usize,
    /// What every row is multiplied by (1, or Gemma's sqrt(hidden size)).
    pub scale: f32,
}

/// `out[t, :] = table[ids[t] - row_start, :] * scale` for ids in `[row_start, row_start +
/// row_count)`.
pub fn embedding_forward(ctx: &GpuContext, enc: &mut Encoder, e: Embedding<'_>) -> Result<()> {
    let Embedding { ids, table, out, n_tokens, dim, row_start, row_count, scale } = e;
    let p = EmbeddingParams {
        n_tokens: u32_of(n_tokens, "tokens")?,
        dim: u32_of(dim, "dim")?,
        row_start: u32_of(row_start, "row")?,
        row_count: u32_of(row_count, "rows")?,
        scale,
        ..Default::default()
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
    /// One f32 a value.
    F32(&'a wgpu::Buffer),
    /// Two f16 values a u32 (a row's even value in the low half).
    F16(&'a wgpu::Buffer),
}

/// An RMS norm over `n_rows` rows of `dim`: y = rms_norm(x) * w.
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm<'a> {
    /// (n_rows, dim) input.
    pub x: &'a wgpu::Buffer,
    /// (dim) weight.
    pub w: &'a wgpu::Buffer,
    /// (n_rows, dim) output.
    pub y: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub n_rows: usize,
    /// Width of a row.
    pub dim: usize,
    /// Added to the mean square before its root.
    pub eps: f32,
}

/// y = rms_norm(x) * w over rows of `dim`.
pub fn rms_norm_forward(ctx: &GpuContext, enc: &mut Encoder, r: RmsNorm<'_>) -> Result<()> {
    let p = one_norm_params(&r)?;
    ctx.dispatch(enc, &RMS_NORM, &p, &[r.x, r.w, r.y], groups_1d(p.n_rows))
}

/// The params of one RMSNorm.
fn one_norm_params(r: &RmsNorm<'_>) -> Result<RmsNormParams> {
    Ok(RmsNormParams { n_rows: u32_of(r.n_rows, "rows")?, dim: u32_of(r.dim, "dim")?, eps: r.eps, n_rows2: 0 })
}

/// [`rms_norm_forward`] that also keeps each row's 1 / rms = rsqrt(mean(x^2) + eps) in
/// `inv_rms` (`n_rows` values), for weight gradients that read the normed rows through the norm
/// ([`RowInput::RmsNormKept`](super::RowInput::RmsNormKept)) rather than have them written again.
pub fn rms_norm_forward_keeping(
    ctx: &GpuContext,
    enc: &mut Encoder,
    r: RmsNorm<'_>,
    inv_rms: &wgpu::Buffer,
) -> Result<()> {
    if inv_rms.size() < 4 * r.n_rows as u64 {
        let why = format!("the buffer for 1 / rms holds fewer than its {} rows", r.n_rows);
        return Err(Error::invalid("RMSNorm", why));
    }
    let p = one_norm_params(&r)?;
    ctx.dispatch(enc, &RMS_NORM_KEEP, &p, &[r.x, r.w, r.y, inv_rms], groups_1d(p.n_rows))
}

/// Two RMSNorms of rows of the same width and epsilon in one dispatch (each tensor with its
/// own weight and output), as Qwen3's and Gemma 3's per-head norms of q and k are.
pub fn rms_norm_pair_forward(ctx: &GpuContext, enc: &mut Encoder, [a, b]: [RmsNorm<'_>; 2]) -> Result<()> {
    let p = pair_params((a.n_rows, a.dim, a.eps), (b.n_rows, b.dim, b.eps))?;
    let rows = u32_of(a.n_rows + b.n_rows, "rows")?;
    ctx.dispatch(enc, &RMS_NORM_PAIR, &p, &[a.x, a.w, a.y, b.x, b.w, b.y], groups_1d(rows))
}

/// The params of a pair of RMSNorms, each (rows, width, epsilon): the widths and epsilons
/// must agree.
fn pair_params(a: (usize, usize, f32), b: (usize, usize, f32)) -> Result<RmsNormParams> {
    if (a.1, a.2.to_bits()) != (b.1, b.2.to_bits()) {
        return Err(Error::invalid(
            "RMSNorm pair",
            format!("the two tensors differ in width or epsilon ({} and {}, {} and {})", a.1, b.1, a.2, b.2),
        ));
    }
    Ok(RmsNormParams {
        n_rows: u32_of(a.0, "rows")?,
        dim: u32_of(a.1, "dim")?,
        eps: a.2,
        n_rows2: u32_of(b.0, "rows")?,
    })
}

/// Where the tokens of a RoPE call sit (token t at `pos_offset + positions[t]`), and the
/// heads it rotates: the queries' and the keys', in one dispatch.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape<'a> {
    /// Tokens rotated.
    pub n_tokens: usize,
    /// Query heads a token.
    pub n_heads: usize,
    /// Key heads a token.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// The first `rot_dim` values of each head rotate (even, at most head_dim; less than it for
    /// partial RoPE, as Phi-4-mini's); the rest pass unchanged.
    pub rot_dim: usize,
    /// Added to every position (a KV cache's length when decoding).
    pub pos_offset: usize,
    /// (T) u32 positions.
    pub positions: &'a wgpu::Buffer,
}

fn rope(
    ctx: &GpuContext,
    enc: &mut Encoder,
    shader: &Shader,
    [q, k]: [&wgpu::Buffer; 2],
    cos_sin: &wgpu::Buffer,
    s: RopeShape<'_>,
) -> Result<()> {
    if s.rot_dim > s.head_dim || !s.rot_dim.is_multiple_of(2) {
        return Err(Error::invalid("RoPE", format!("rot_dim {} for heads of {}", s.rot_dim, s.head_dim)));
    }
    let p = RopeParams {
        n_tokens: u32_of(s.n_tokens, "tokens")?,
        n_heads: u32_of(s.n_heads, "heads")?,
        n_kv_heads: u32_of(s.n_kv_heads, "key heads")?,
        head_dim: u32_of(s.head_dim, "head_dim")?,
        pos_offset: u32_of(s.pos_offset, "position")?,
        rot_dim: u32_of(s.rot_dim, "rot_dim")?,
        ..Default::default()
    };
    let heads = u32_of(s.n_heads + s.n_kv_heads, "heads")?;
    ctx.dispatch(enc, shader, &p, &[q, k, cos_sin, s.positions], [(p.rot_dim / 2).div_ceil(64), heads, p.n_tokens])
}

/// In-place RoPE on the queries q (T, n_heads * head_dim) and the keys k (T, n_kv_heads *
/// head_dim), one dispatch for both.
pub fn rope_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    qk: [&wgpu::Buffer; 2],
    cos_sin: &wgpu::Buffer,
    s: RopeShape<'_>,
) -> Result<()> {
    rope(ctx, enc, &ROPE, qk, cos_sin, s)
}

/// In-place RoPE backward on the query and key gradients, laid out as [`rope_forward`]'s
/// operands: the inverse rotation.
pub fn rope_backward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    dqk: [&wgpu::Buffer; 2],
    cos_sin: &wgpu::Buffer,
    s: RopeShape<'_>,
) -> Result<()> {
    rope(ctx, enc, &ROPE_BACKWARD, dqk, cos_sin, s)
}

/// The backward of an [`RmsNorm`]: its input and weight, the output gradient and where the
/// input gradient is added.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormGrad<'a> {
    /// (n_rows, dim) the forward's input.
    pub x: &'a wgpu::Buffer,
    /// (dim) the forward's weight.
    pub w: &'a wgpu::Buffer,
    /// (n_rows, dim) the output's gradient.
    pub dy: &'a wgpu::Buffer,
    /// (n_rows, dim) the input's gradient, added to.
    pub dx: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub n_rows: usize,
    /// Width of a row.
    pub dim: usize,
    /// As in the forward.
    pub eps: f32,
}

/// dx += d rms_norm(x) / dx applied to dy (the norm weight is frozen).
pub fn rms_norm_backward(ctx: &GpuContext, enc: &mut Encoder, g: RmsNormGrad<'_>) -> Result<()> {
    let RmsNormGrad { x, w, dy, dx, n_rows, dim, eps } = g;
    let p = RmsNormParams { n_rows: u32_of(n_rows, "rows")?, dim: u32_of(dim, "dim")?, eps, n_rows2: 0 };
    ctx.dispatch(enc, &RMS_NORM_BACKWARD, &p, &[x, w, dy, dx], groups_1d(p.n_rows))
}

/// The backward of [`rms_norm_pair_forward`]: two [`rms_norm_backward`]s of rows of the same
/// width and epsilon in one dispatch.
pub fn rms_norm_pair_backward(ctx: &GpuContext, enc: &mut Encoder, [a, b]: [RmsNormGrad<'_>; 2]) -> Result<()> {
    let p = pair_params((a.n_rows, a.dim, a.eps), (b.n_rows, b.dim, b.eps))?;
    let rows = u32_of(a.n_rows + b.n_rows, "rows")?;
    let buffers = [a.x, a.w, a.dy, a.dx, b.x, b.w, b.dy, b.dx];
    ctx.dispatch(enc, &RMS_NORM_BACKWARD_PAIR, &p, &buffers, groups_1d(rows))
}

/// out = silu(gate) * up over n values.
pub fn silu_mul_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    gate: &wgpu::Buffer,
    up: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &SILU_MUL, &p, &[gate, up, out], groups_1d(p.n.div_ceil(256)))
}

/// out = gelu(gate) * up over n values, GELU's tanh approximation (Gemma's GeGLU).
pub fn gelu_mul_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    gate: &wgpu::Buffer,
    up: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &GELU_MUL, &p, &[gate, up, out], groups_1d(p.n.div_ceil(256)))
}

/// The backward of out = act(gate) * up over n values (SwiGLU's or GeGLU's).
#[derive(Debug, Clone, Copy)]
pub struct SiluMulGrad<'a> {
    /// The forward's gate input.
    pub gate: &'a wgpu::Buffer,
    /// The forward's up input.
    pub up: &'a wgpu::Buffer,
    /// The output's gradient.
    pub dout: &'a wgpu::Buffer,
    /// The gate's gradient (overwritten).
    pub dgate: &'a wgpu::Buffer,
    /// The up input's gradient (overwritten).
    pub dup: &'a wgpu::Buffer,
    /// Values in each.
    pub n: usize,
}

/// dgate, dup of out = silu(gate) * up, given dout.
pub fn silu_mul_backward(ctx: &GpuContext, enc: &mut Encoder, g: SiluMulGrad<'_>) -> Result<()> {
    let SiluMulGrad { gate, up, dout, dgate, dup, n } = g;
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &SILU_MUL_BACKWARD, &p, &[gate, up, dout, dgate, dup], groups_1d(p.n.div_ceil(256)))
}

/// dgate, dup of out = gelu(gate) * up (tanh approximation), given dout.
pub fn gelu_mul_backward(ctx: &GpuContext, enc: &mut Encoder, g: SiluMulGrad<'_>) -> Result<()> {
    let SiluMulGrad { gate, up, dout, dgate, dup, n } = g;
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &GELU_MUL_BACKWARD, &p, &[gate, up, dout, dgate, dup], groups_1d(p.n.div_ceil(256)))
}

/// Gemma 2's final logit soft cap, in place over n values: x <- cap · tanh(x / cap) (see
/// `logit_softcap.wgsl`; the cross-entropy's backward applies its derivative).
pub fn logit_softcap(ctx: &GpuContext, enc: &mut Encoder, x: &wgpu::Buffer, n: usize, cap: f32) -> Result<()> {
    if !(cap.is_finite() && cap > 0.0) {
        return Err(Error::invalid("logit soft cap", format!("{cap} (expected a positive number)")));
    }
    let p = SoftcapParams { n: u32_of(n, "elements")?, cap, ..Default::default() };
    ctx.dispatch(enc, &LOGIT_SOFTCAP, &p, &[x], groups_1d(p.n.div_ceil(256)))
}

/// Inverted dropout in place over n values with keep probability 1 - p and the mask of
/// `seed` (see `dropout.wgsl`); also its own backward.
pub fn dropout(ctx: &GpuContext, enc: &mut Encoder, x: &wgpu::Buffer, n: usize, p: f32, seed: u32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid("dropout", format!("p must be in [0, 1) (got {p})")));
    }
    let (threshold, scale) = crate::prim::dropout_threshold(p);
    let params = DropoutParams { n: u32_of(n, "elements")?, seed, threshold, scale };
    ctx.dispatch(enc, &DROPOUT, &params, &[x], groups_1d(params.n.div_ceil(256)))
}

/// Stores n f32 values of `x` as f16 in `packed` (ceil(n / 2) words, two halves each, low
/// half first) and rounds `x` in place to the stored values (see `f16_pack.wgsl`).
pub fn f16_pack(ctx: &GpuContext, enc: &mut Encoder, x: &wgpu::Buffer, packed: &wgpu::Buffer, n: usize) -> Result<()> {
    check_f16_sizes(x, packed, n)?;
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &F16_PACK, &p, &[x, packed], groups_1d(p.n.div_ceil(512)))
}

/// Reads n values stored by [`f16_pack`] back into `x` as f32.
pub fn f16_unpack(
    ctx: &GpuContext,
    enc: &mut Encoder,
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
pub fn add_forward(ctx: &GpuContext, enc: &mut Encoder, x: &wgpu::Buffer, y: &wgpu::Buffer, n: usize) -> Result<()> {
    let p = ElementwiseParams { n: u32_of(n, "elements")?, ..Default::default() };
    ctx.dispatch(enc, &ADD, &p, &[x, y], groups_1d(p.n.div_ceil(256)))
}
