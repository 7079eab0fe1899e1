//! Linear layers: forward, input gradient and weight gradient over dense, f16, NF4 and GGUF
//! (Q4_0, Q4_1, and two 4-bit planes for wider codes) weights, with split-K for small grids.

use super::*;
use crate::gpu::KernelFamily;

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
    Nf4 {
        /// (N*K/8) u32: eight 4-bit codes a word.
        packed: &'a wgpu::Buffer,
        /// (N*K/block_size) f32: each block's absolute maximum.
        absmax: &'a wgpu::Buffer,
        /// Values per absmax.
        block_size: usize,
    },
    /// GGUF's Q4_0 as it is stored (repacked into NF4's nibble order): (N*K/8) u32 of eight
    /// 4-bit codes, and one f32 scale (ggml's f16 d) per block of 32; value = (q - 8) * d.
    Q4_0 {
        /// (N*K/8) u32: eight 4-bit codes a word.
        packed: &'a wgpu::Buffer,
        /// (N*K/32) f32: each block's scale.
        scales: &'a wgpu::Buffer,
    },
    /// GGUF's Q4_1 as it is stored (repacked into NF4's nibble order): (N*K/8) u32 of eight
    /// 4-bit codes, and each block's scale d and minimum m as two f32; value = q * d + m.
    /// Blocks of 32 for Q4_1 and Q4_K's sub-blocks; 16 or 32 for a plane of [`Weight::Planes`].
    Q4_1 {
        /// (N*K/8) u32: eight 4-bit codes a word.
        packed: &'a wgpu::Buffer,
        /// (N*K/block_size, 2) f32: each block's scale and minimum.
        coeffs: &'a wgpu::Buffer,
        /// Values a scale and minimum (a multiple of 8).
        block_size: usize,
    },
    /// A GGUF tensor of 5-, 6- or 8-bit codes as two Q4_1 planes (see
    /// `quant::gguf_blocks::Planes`): the weight is their sum, so a matmul is two, the second
    /// added to the first's output.
    Planes {
        /// The high four bits of each code.
        hi: Q4Plane<'a>,
        /// The low four bits.
        lo: Q4Plane<'a>,
        /// Values a scale and minimum in each plane.
        block_size: usize,
    },
}

/// One plane of [`Weight::Planes`]: codes and coefficients as [`Weight::Q4_1`] holds them.
#[derive(Debug, Clone, Copy)]
pub struct Q4Plane<'a> {
    /// (N*K/8) u32: eight 4-bit codes a word.
    pub packed: &'a wgpu::Buffer,
    /// (N*K/block_size, 2) f32: each block's scale and minimum.
    pub coeffs: &'a wgpu::Buffer,
}

/// Values per scale of [`Weight::Q4_0`] (and per scale and minimum of GGUF's Q4_1 and Q4_K).
pub const Q4_0_BLOCK: usize = 32;

impl Weight<'_> {
    /// Bytes a matmul reads of an (n, k) weight.
    fn bytes(&self, n: usize, k: usize) -> f64 {
        let nk = (n * k) as f64;
        match self {
            Weight::Dense(_) | Weight::DenseAt(..) => 4.0 * nk,
            Weight::F16(_) => 2.0 * nk,
            Weight::Nf4 { block_size, .. } => nk / 2.0 + 4.0 * nk / (*block_size).max(1) as f64,
            Weight::Q4_0 { .. } => nk / 2.0 + 4.0 * nk / Q4_0_BLOCK as f64,
            Weight::Q4_1 { block_size, .. } => nk / 2.0 + 8.0 * nk / (*block_size).max(1) as f64,
            Weight::Planes { block_size, .. } => nk + 16.0 * nk / (*block_size).max(1) as f64,
        }
    }

    /// The two Q4_1 weights of [`Weight::Planes`], or `None` for any other weight.
    fn planes(&self) -> Option<[Weight<'_>; 2]> {
        match *self {
            Weight::Planes { hi, lo, block_size } => {
                Some([hi, lo].map(|p| Weight::Q4_1 { packed: p.packed, coeffs: p.coeffs, block_size }))
            }
            _ => None,
        }
    }
}

/// What a matmul of (m, n, k) computes and moves: 2mnk operations; the operands `x_elems` and
/// `out_elems` f32 values (the output read too when accumulating) and the weight's bytes.
fn matmul_cost(
    m: usize,
    n: usize,
    k: usize,
    weight_bytes: f64,
    (x_elems, out_elems): (usize, usize),
    accumulate: bool,
) -> Cost {
    let out = 4.0 * out_elems as f64 * if accumulate { 2.0 } else { 1.0 };
    Cost { flops: 2.0 * (m * n * k) as f64, bytes: 4.0 * x_elems as f64 + weight_bytes + out }
}

/// Output placement and epilogue: y is (rows, stride); a call writes columns
/// [col_offset, col_offset + cols) with `alpha * result`, added to y when `accumulate`.
#[derive(Debug, Clone, Copy)]
pub struct OutCols {
    /// Values in a row of y.
    pub stride: usize,
    /// The first column written.
    pub col_offset: usize,
    /// The factor of the result.
    pub alpha: f32,
    /// Add to y rather than overwrite it.
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
    /// The gradient.
    pub buf: &'a wgpu::Buffer,
    /// Values in a row of it.
    pub stride: usize,
    /// The first column read.
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
        y_seg_rows: 0,
        accumulate: out.accumulate as u32,
        alpha: out.alpha,
        w_offset: 0,
        dy_stride: 0,
        dy_col_offset: 0,
        split_k: 0,
        x_op: 0,
        norm_eps: 0.0,
        lora_rank: 0,
        lora_b: 0,
        lora_scale: 0.0,
        seg_rows: 0,
        w_offset1: 0,
        w_offset2: 0,
        lora_h: 0,
        x_stride: u32_of(k, "in features")?,
        x_col_offset: 0,
        lora_h_stride: 0,
        lora_seg_rows: 0,
        lora_w1: 0,
        lora_w2: 0,
        y_offset1: 0,
        y_offset2: 0,
        _pad0: 0,
        _pad1: 0,
    })
}

/// The quantized kernels' pipeline constant, their block size (`common/block_size.wgsl`): a
/// pipeline is compiled for each block size a model uses, so the kernels divide by a constant.
/// They read whole packed words (8 codes), so K and the block size must be multiples of 8.
fn block_constant(k: usize, block_size: usize) -> Result<u32> {
    if !k.is_multiple_of(8) || !block_size.is_multiple_of(8) || block_size == 0 {
        return Err(Error::invalid(
            "NF4 matmul",
            format!("needs K % 8 == 0 and a block size that is a positive multiple of 8 (K {k}, block {block_size})"),
        ));
    }
    u32_of(block_size, "block size")
}

/// The pipeline constants a matmul kernel is made with.
#[derive(Debug, Clone, Copy, Default)]
struct Constants {
    /// The quantized kernels' block size (see [`block_constant`]).
    block: Option<u32>,
    /// A many-row forward kernel summing each row's own adapter's B product
    /// (`common/lora_table.wgsl`); off, that code is dead and compiles to nothing.
    rows_lora: bool,
}

impl Constants {
    /// The constants as a pipeline takes them (see [`ConstantList::get`]), without allocating.
    fn list(self) -> ConstantList {
        let mut list = ConstantList([("", 0); 2], 0);
        for (name, value) in [("BLOCK_SIZE", self.block), ("ROWS_LORA", self.rows_lora.then_some(1))] {
            if let Some(v) = value {
                list.0[list.1] = (name, v);
                list.1 += 1;
            }
        }
        list
    }
}

/// [`Constants`] as (name, value) pairs: the first `.1` of `.0`.
struct ConstantList([(&'static str, u32); 2], usize);

impl ConstantList {
    fn get(&self) -> &[(&'static str, u32)] {
        &self.0[..self.1]
    }
}

fn check_f16(k: usize) -> Result<()> {
    if !k.is_multiple_of(2) {
        return Err(Error::invalid("f16 matmul", format!("needs an even K (K {k})")));
    }
    Ok(())
}

/// A linear layer's forward: x (m, k) times w (n, k) transposed, plus the bias, into the
/// columns of y that `out` says.
#[derive(Debug, Clone, Copy)]
pub struct Matmul<'a> {
    /// (m, k) input.
    pub x: &'a wgpu::Buffer,
    /// (n, k) weight.
    pub w: Weight<'a>,
    /// (n) bias, if any.
    pub bias: Option<&'a wgpu::Buffer>,
    /// The output (see `out`).
    pub y: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Where in y the result goes, and how.
    pub out: OutCols,
}

/// `y[m, col_offset + n] (+)= alpha * x[m, :] . w[n, :] (+ bias[n])`.
pub fn matmul_forward(ctx: &GpuContext, enc: &mut Encoder, mm: Matmul<'_>) -> Result<()> {
    forward(ctx, enc, mm, Fused::default(), Reads::default())
}

/// Where a many-row product ([`matmul_shared_forward`]) reads its operands.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shared {
    /// x's row stride and the first column read, where x is a block of columns of a wider
    /// matrix (a LoRA B product reading its module's x A^T out of an h that several modules
    /// share); `None`: a contiguous (m, k) x.
    pub x_cols: Option<(usize, usize)>,
    /// Where the rows of a [`Weight::DenseAt`] come from (the A matrices of several modules).
    pub gather: Option<Gather>,
}

/// [`matmul_forward`] of two rows or more, reading a block of x's columns and gathering the
/// dense weight's rows as `shared` says: `y[m, col_offset + n] (+)= alpha * x[m, c0 + j] .
/// w[row(n) + j]`. Training and prompts run the x A^T of the modules that read one input (q, k
/// and v; gate and up) as one product, and each module's B product reads its columns of the
/// result.
pub fn matmul_shared_forward(ctx: &GpuContext, enc: &mut Encoder, mm: Matmul<'_>, shared: Shared) -> Result<()> {
    let bad = |what: String| Err(Error::invalid("shared matmul", what));
    if mm.m < 2 {
        return bad("reads one row: see matvec_fused_forward".into());
    }
    check_x_cols(mm, shared.x_cols).or_else(bad)?;
    if let Some(g) = shared.gather {
        check_gather(mm, g).or_else(bad)?;
    }
    forward(
        ctx,
        enc,
        mm,
        Fused { gather: shared.gather, ..Fused::default() },
        Reads { x_cols: shared.x_cols, table: None },
    )
}

/// [`matmul_forward`] of two rows or more with a LoRA adapter's B product fused in:
/// `y[m, col_offset + n] (+)= alpha * x[m, c0 + j] . w[n, j] (+ bias[n]) + scale * h[m, :] .
/// B[n, :]`, x read as `x_cols` says (see [`Shared::x_cols`]). The B product's rank columns
/// are more of the reduction, after x's, so the base product and the adapter's take one
/// dispatch and one pass over y instead of two; prompts and training run each adapted module
/// so. Refused: one row (see [`matvec_fused_forward`]), an alpha of 0 (the B product is summed
/// before alpha scales the sum), and an h or B that does not fit its buffer.
pub fn matmul_lora_forward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    mm: Matmul<'_>,
    lora: LoraB<'_>,
    x_cols: Option<(usize, usize)>,
) -> Result<()> {
    let bad = |what: String| Err(Error::invalid("matmul with a LoRA B product", what));
    if mm.m < 2 {
        return bad("reads one row: see matvec_fused_forward".into());
    }
    if !mm.out.alpha.is_normal() {
        return bad(format!("sums the B product before alpha scales the sum, so alpha cannot be {}", mm.out.alpha));
    }
    let h_end = (mm.m - 1) * lora.h_stride + lora.h_offset + lora.rank;
    if lora.rank == 0 || lora.h_offset + lora.rank > lora.h_stride || 4 * h_end as u64 > lora.h.size() {
        return bad(format!(
            "{} rows of h of rank {} from column {} with a row stride of {} do not fit h",
            mm.m, lora.rank, lora.h_offset, lora.h_stride
        ));
    }
    if 4 * (lora.b_offset + mm.n * lora.rank) as u64 > lora.params.size() {
        return bad(format!(
            "a B of rank {} for {} outputs from element {} does not fit",
            lora.rank, mm.n, lora.b_offset
        ));
    }
    check_x_cols(mm, x_cols).or_else(bad)?;
    forward(ctx, enc, mm, Fused { lora: Some(lora), ..Fused::default() }, Reads { x_cols, table: None })
}

/// Why `mm`'s rows of k columns, read from x as `x_cols` says (see [`Shared::x_cols`]), do not
/// fit x, if they do not.
fn check_x_cols(mm: Matmul<'_>, x_cols: Option<(usize, usize)>) -> std::result::Result<(), String> {
    let Some((stride, col)) = x_cols else { return Ok(()) };
    if col + mm.k > stride || 4 * ((mm.m - 1) * stride + col + mm.k) as u64 > mm.x.size() {
        return Err(format!(
            "{} rows of {} columns from column {col} with a row stride of {stride} do not fit x",
            mm.m, mm.k
        ));
    }
    Ok(())
}

/// Why rows gathered by `g` from `mm`'s dense weight do not fit, if they do not.
fn check_gather(mm: Matmul<'_>, g: Gather) -> std::result::Result<(), String> {
    let Weight::DenseAt(w, first) = mm.w else {
        return Err("gathers the rows of a dense weight at an offset only".into());
    };
    if !blocks_fit(first, g, (mm.n, mm.k), w.size()) {
        return Err(format!("{} rows gathered in blocks of {} do not fit", mm.n, g.rows));
    }
    Ok(())
}

/// Whether n rows of k values, in blocks of `g.rows` starting at `first` and `g.offsets`, lie
/// within a buffer of `size` bytes (every block checked, as callers pass `first` for unused ones).
fn blocks_fit(first: usize, g: Gather, (n, k): (usize, usize), size: u64) -> bool {
    let ends = [first, g.offsets[0], g.offsets[1]].map(|o| 4 * (o + g.rows * k) as u64);
    g.rows > 0 && n <= 3 * g.rows && ends.iter().all(|&e| e <= size)
}

/// The op before a product that it fuses into reading its input: the norm and the gates for
/// one row ([`matvec_fused_forward`]); the gates and the kept norm for the x of a weight
/// gradient ([`WeightGradCols::x_input`]).
#[derive(Debug, Clone, Copy)]
pub enum RowInput<'a> {
    /// x RMS-normed as `rms_norm_forward` norms it: `x * w / sqrt(mean(x^2) + eps)`.
    RmsNorm {
        /// (k) the norm's weight.
        w: &'a wgpu::Buffer,
        /// Added to the mean square.
        eps: f32,
    },
    /// x RMS-normed with each row's 1 / rms as `rms_norm_forward_keeping` kept it, read as that
    /// norm wrote its rows: `w[k] * (x[m, k] * inv_rms[m])`. Many rows (a weight gradient),
    /// which cannot sum a row's squares themselves.
    RmsNormKept {
        /// (k) the norm's weight.
        w: &'a wgpu::Buffer,
        /// (m) each row's 1 / rms.
        inv_rms: &'a wgpu::Buffer,
    },
    /// `silu(x) * up` as `silu_mul_forward` computes it: x is the gate's output.
    SiluMul {
        /// The up projection's output, laid out as x.
        up: &'a wgpu::Buffer,
    },
    /// `gelu_tanh(x) * up` as `gelu_mul_forward` computes it.
    GeluMul {
        /// The up projection's output, laid out as x.
        up: &'a wgpu::Buffer,
    },
}

impl<'a> RowInput<'a> {
    /// The kernel's `x_op` (common/params.wgsl) and its operand (`aux`).
    fn op(self) -> (u32, &'a wgpu::Buffer) {
        match self {
            RowInput::RmsNorm { w, .. } => (X_RMS_NORM, w),
            RowInput::RmsNormKept { w, .. } => (X_RMS_KEPT, w),
            RowInput::SiluMul { up } => (X_SILU_MUL, up),
            RowInput::GeluMul { up } => (X_GELU_MUL, up),
        }
    }
}

/// A LoRA adapter's B product that a forward product adds to its own: `y[m, col_offset + n]
/// += scale * h[m, :] . B[n, :]`. One row adds it in its epilogue ([`matvec_fused_forward`]),
/// many rows sum it as more of their reduction ([`matmul_lora_forward`]).
#[derive(Debug, Clone, Copy)]
pub struct LoraB<'a> {
    /// h = x A^T (rank values a row from column `h_offset`), from a dispatch before.
    pub h: &'a wgpu::Buffer,
    /// h's first column (one row: its first element).
    pub h_offset: usize,
    /// h's row stride (many rows; one row reads row 0 only).
    pub h_stride: usize,
    /// The adapter's flat parameters, holding B (n, rank) from element `b_offset`.
    pub params: &'a wgpu::Buffer,
    /// B's first element in `params`.
    pub b_offset: usize,
    /// The adapter's rank.
    pub rank: usize,
    /// B A's factor.
    pub scale: f32,
}

/// The rows of a one-row product's [`Weight::DenseAt`] gathered from up to three blocks of the
/// same buffer: rows [i * rows, (i + 1) * rows) start at the weight's offset for block 0 and at
/// `offsets[i - 1]` for blocks 1 and 2. Decoding's x A^T of the adapted modules that read the
/// same input (q, k and v; gate and up), whose A matrices lie apart in the adapter's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Gather {
    /// Rows a block.
    pub rows: usize,
    /// The first elements of blocks 1 and 2.
    pub offsets: [usize; 2],
}

/// What a one-row product fuses in: the op before it that it applies as it reads x, a LoRA B
/// product that it adds in its epilogue, and rows of its dense weight gathered from blocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fused<'a> {
    /// The op before the product.
    pub input: Option<RowInput<'a>>,
    /// The LoRA B product after it.
    pub lora: Option<LoraB<'a>>,
    /// Where the rows of a [`Weight::DenseAt`] come from.
    pub gather: Option<Gather>,
}

/// [`matmul_forward`] of one row with what `fused` says fused in: the product of the
/// RMS-normed row, `y[0, col_offset + n] (+)= alpha * rstd * (x[0, :] * norm_w) . w[n, :] (+
/// bias[n])` with `rstd = 1 / sqrt(mean(x^2) + eps)`, or of the gated row `act(x) * up`, and
/// then `+= scale * h . B[n, :]`. One dispatch instead of up to three, and the normed or gated
/// row is never written: decoding's products.
pub fn matvec_fused_forward(ctx: &GpuContext, enc: &mut Encoder, mm: Matmul<'_>, fused: Fused<'_>) -> Result<()> {
    let bad = |what: String| Err(Error::invalid("fused matvec", what));
    if mm.m != 1 {
        return bad(format!("fuses its ops into the product of one row, not {}", mm.m));
    }
    if fused.input.is_some_and(|i| i.op().1.size() < 4 * mm.k as u64) {
        return bad(format!("the op's operand holds fewer than {} values", mm.k));
    }
    let fits = |l: &LoraB<'_>| {
        l.rank > 0
            && l.h.size() >= 4 * (l.h_offset + l.rank) as u64
            && l.params.size() >= 4 * (l.b_offset + mm.n * l.rank) as u64
    };
    if let Some(l) = fused.lora.filter(|l| !fits(l)) {
        return bad(format!(
            "a LoRA B of rank {} for {} outputs from element {} does not fit",
            l.rank, mm.n, l.b_offset
        ));
    }
    if let Some(g) = fused.gather {
        check_gather(mm, g).or_else(bad)?;
    }
    forward(ctx, enc, mm, fused, Reads::default())
}

/// How a many-row product reads beyond x and the weight.
#[derive(Clone, Copy, Default)]
struct Reads<'a> {
    /// x's row stride and first column (see [`Shared::x_cols`]).
    x_cols: Option<(usize, usize)>,
    /// With a [`LoraB`] made by [`matmul_rows_lora_forward`]: the rows' adapter table, each
    /// row its own B (the LoraB's `b_offset` the module's first entry, its rank the slot width).
    table: Option<&'a wgpu::Buffer>,
}

/// Records a forward product.
fn forward(ctx: &GpuContext, enc: &mut Encoder, mm: Matmul<'_>, fused: Fused<'_>, reads: Reads<'_>) -> Result<()> {
    if let Some([hi, lo]) = mm.w.planes() {
        forward(ctx, enc, Matmul { w: hi, ..mm }, fused, reads)?;
        let lo_plane = Matmul { w: lo, bias: None, out: mm.out.accumulated(), ..mm };
        return forward(ctx, enc, lo_plane, Fused { lora: None, ..fused }, Reads { table: None, ..reads });
    }
    let Reads { x_cols, table } = reads;
    if let Some(RowInput::RmsNormKept { .. }) = fused.input {
        let why = "a one-row product norms its row itself (RowInput::RmsNorm); a kept 1 / rms is for weight gradients";
        return Err(Error::invalid("matmul", why));
    }
    let Matmul { x, w, bias, y, m, n, k, out } = mm;
    let mut p = matmul_params(m, n, k, out)?;
    let mut x_ok = true;
    if let Some((stride, col)) = x_cols {
        p.x_stride = u32_of(stride, "x row stride")?;
        p.x_col_offset = u32_of(col, "x column")?;
        // simd8 reads x as vec4s.
        x_ok = stride.is_multiple_of(4) && col.is_multiple_of(4);
    }
    p.has_bias = bias.is_some() as u32;
    let Fused { input, mut lora, gather } = fused;
    if table.is_some() && (m < 2 || input.is_some() || out.alpha != 1.0 || lora.is_none()) {
        return Err(Error::invalid("matmul", "gathered LoRA fuses into many-row products of x as it is, alpha 1"));
    }
    if let Some(input) = input {
        p.x_op = input.op().0;
        if let RowInput::RmsNorm { eps, .. } = input {
            p.norm_eps = eps;
        }
    }
    if let Some(l) = lora {
        p.lora_rank = u32_of(l.rank, "LoRA rank")?;
        p.lora_b = u32_of(l.b_offset, "LoRA B offset")?;
        p.lora_h = u32_of(l.h_offset, "LoRA h offset")?;
        p.lora_h_stride = u32_of(l.h_stride, "LoRA h row stride")?;
        // One row adds the B product after its epilogue; many rows sum it with the base
        // product, whose alpha then scales it too.
        p.lora_scale = if m == 1 { l.scale } else { l.scale / out.alpha };
    }
    let mut gathered_ok = true;
    if let Some(g) = gather {
        p.seg_rows = u32_of(g.rows, "rows a block")?;
        p.w_offset1 = u32_of(g.offsets[0], "weight offset")?;
        p.w_offset2 = u32_of(g.offsets[1], "weight offset")?;
        gathered_ok = g.offsets.iter().all(|o| o.is_multiple_of(4));
    }
    // The bias binding must exist even when unused; x serves as a harmless dummy.
    let b = bias.unwrap_or(x);
    let mut block = None;
    // The one-row kernels: [portable's, simd8's, portable's with subgroup operations].
    let (row, family, simd_ok, buffers): ([&'static Shader; 3], Family, bool, Vec<&wgpu::Buffer>) = match w {
        Weight::Dense(w) => ([&MATVEC, &MATVEC_SIMD8, &MATVEC_SUBGROUP], DENSE, true, vec![x, w, b, y]),
        Weight::DenseAt(w, offset) => {
            p.w_offset = u32_of(offset, "weight offset")?;
            ([&MATVEC, &MATVEC_SIMD8, &MATVEC_SUBGROUP], DENSE, offset.is_multiple_of(4), vec![x, w, b, y])
        }
        Weight::F16(w) => {
            check_f16(k)?;
            ([&MATVEC_F16, &MATVEC_F16_SIMD8, &MATVEC_F16_SUBGROUP], F16, true, vec![x, w, b, y])
        }
        Weight::Nf4 { packed, absmax, block_size } => {
            block = Some(block_constant(k, block_size)?);
            ([&MATVEC_NF4, &MATVEC_NF4_SIMD8, &MATVEC_NF4_SUBGROUP], NF4, true, vec![x, packed, absmax, b, y])
        }
        Weight::Q4_0 { packed, scales } => {
            block = Some(block_constant(k, Q4_0_BLOCK)?);
            ([&MATVEC_Q4_0, &MATVEC_Q4_0_SIMD8, &MATVEC_Q4_0_SUBGROUP], Q4_0, true, vec![x, packed, scales, b, y])
        }
        Weight::Q4_1 { packed, coeffs, block_size } => {
            block = Some(block_constant(k, block_size)?);
            ([&MATVEC_Q4_1, &MATVEC_Q4_1_SIMD8, &MATVEC_Q4_1_SUBGROUP], Q4_1, true, vec![x, packed, coeffs, b, y])
        }
        Weight::Planes { .. } => return Err(Error::invalid("matmul", "two planes reach one kernel")),
    };
    // One row (decoding) splits the reduction over a workgroup (matvec); more rows use the
    // tiled kernels. CPU rasterizers get register-tiled variants of both where K allows.
    let simd_ok = simd_ok && gathered_ok && x_ok && k.is_multiple_of(8);
    // Each row's own B product (gathered LoRA) is summed by the product (common/lora_table.wgsl)
    // but where a tiled core would sum more slot columns than the product has: there
    // lora_rows.wgsl adds it after.
    let mut apart = None;
    if let (Some(l), Some(table)) = (lora, table) {
        let simd8 = ctx.report.kernels.matmul == KernelFamily::Simd8 && simd_ok;
        if !simd8 && m * l.rank > k {
            apart = Some((l, table));
            lora = None;
            p.lora_rank = 0;
        }
    }
    let rows_lora = table.is_some() && lora.is_some();
    let lora_columns = lora.map(|l| if rows_lora { m * l.rank } else { l.rank });
    let cost = matmul_cost(m, n, k, w.bytes(n, k), (m * k, m * n), out.accumulate);
    let (shader, groups) = match m {
        1 if ctx.report.kernels.matmul == KernelFamily::Simd8 && simd_ok => (row[1], [p.n.div_ceil(32), 1, 1]),
        1 if ctx.report.kernels.matmul.reduces_rows_in_subgroups() && ctx.report.subgroups => {
            (row[2], [p.n.div_ceil(8), 1, 1])
        }
        1 => (row[0], [p.n.div_ceil(8), 1, 1]),
        _ => {
            // A fused B product's columns follow x's in the reduction, from the step after K.
            let red = lora_columns.map_or(Ok(p.k), |c| u32_of(k.next_multiple_of(TILE_STEP) + c, "reduction"))?;
            let constants = Constants { block, rows_lora };
            // The narrow blocks take steps of 8, where a fused B product's columns start at one of 16.
            let family = if lora.is_some() { Family { narrow: None, ..family } } else { family };
            let kernel = many_rows(pick_of(ctx, false), family, simd_ok, (p.m, p.n, red), constants);
            let mut cost = cost;
            if let Some(l) = lora {
                cost.flops += 2.0 * (m * n * l.rank) as f64;
                cost.bytes += 4.0 * ((m + n) * l.rank) as f64;
            }
            // After y: the rows' adapter table (the one-row kernels' op operand), h and B; x
            // the dummy.
            let aux = if rows_lora { table.unwrap_or(x) } else { x };
            let after_y = [aux, lora.map_or(x, |l| l.h), lora.map_or(x, |l| l.params)];
            run_many_rows(ctx, enc, kernel, p, (&buffers, &after_y), cost)?;
            return match apart {
                Some((l, table)) => {
                    let rows = RowsAdapters { w: l.params, table, table_row: l.b_offset, width: l.rank };
                    let b = RowsB { adapters: rows, h: l.h, h_col: l.h_offset, h_stride: l.h_stride };
                    lora_rows_b(ctx, enc, b, y, (m, n))
                }
                None => Ok(()),
            };
        }
    };
    // The one-row kernels bind what they fuse in last: x serves as the dummy.
    let mut buffers = buffers;
    buffers.extend([input.map_or(x, |i| i.op().1), lora.map_or(x, |l| l.h), lora.map_or(x, |l| l.params)]);
    let mut cost = cost;
    if input.is_some() {
        cost.bytes += 4.0 * k as f64;
    }
    if let Some(l) = lora {
        cost.flops += 2.0 * (n * l.rank) as f64;
        cost.bytes += 4.0 * ((n + 1) * l.rank) as f64;
    }
    let constants = Constants { block, rows_lora: false }.list();
    ctx.dispatch_costed(enc, Dispatch { shader, buffers: &buffers, groups, constants: constants.get() }, &p, cost)
}

/// A many-row matmul's kernel and output shape: (rows, cols) outputs over a reduction of
/// length `red`. See [`many_rows`] and [`run_many_rows`].
struct ManyRows {
    shader: &'static Shader,
    constants: Constants,
    groups: [u32; 3],
    tiled: bool,
    rows: u32,
    cols: u32,
    red: u32,
}

/// One many-row matmul in each kernel family (see [`crate::gpu::family`]); the families with f16
/// products ([`F16Products`]) have the forward kernels and the input gradients through frozen
/// (f16, NF4) weights, coop8 every one.
#[derive(Clone, Copy)]
struct Family {
    portable: &'static Shader,
    simd8: &'static Shader,
    tile128: &'static Shader,
    /// tile128's kernel on 64 x 64 blocks, for products whose 128 x 128 grid is small.
    tile64: &'static Shader,
    coop8: &'static Shader,
    /// coop16's and half's kernels, where they have this product.
    f16: Option<F16Products>,
    /// tile128's kernels on blocks of 256 rows x 16 columns and 16 x 256, for products with a
    /// narrow side (LoRA's); dense kernels only.
    narrow: Option<[&'static Shader; 2]>,
}

/// A product's kernels in the two families whose products take f16 operands: coop16 (matrix
/// units) and half (f16 arithmetic without them).
#[derive(Clone, Copy)]
struct F16Products {
    coop16: &'static Shader,
    half: &'static Shader,
}

impl F16Products {
    /// `family`'s kernel, when it is one of the two.
    fn of(self, family: KernelFamily) -> Option<&'static Shader> {
        match family {
            KernelFamily::Coop16 => Some(self.coop16),
            KernelFamily::Half => Some(self.half),
            _ => None,
        }
    }
}

const DENSE: Family = Family {
    portable: &MATMUL,
    simd8: &MATMUL_SIMD8,
    tile128: &MATMUL_T128,
    tile64: &MATMUL_T64,
    coop8: &MATMUL_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_COOP16, half: &MATMUL_HALF }),
    narrow: Some([&MATMUL_NARROW, &MATMUL_NARROW_ROWS]),
};
const F16: Family = Family {
    portable: &MATMUL_F16,
    simd8: &MATMUL_F16_SIMD8,
    tile128: &MATMUL_F16_T128,
    tile64: &MATMUL_F16_T64,
    coop8: &MATMUL_F16_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_F16_COOP16, half: &MATMUL_F16_HALF }),
    narrow: None,
};
const NF4: Family = Family {
    portable: &MATMUL_NF4,
    simd8: &MATMUL_NF4_SIMD8,
    tile128: &MATMUL_NF4_T128,
    tile64: &MATMUL_NF4_T64,
    coop8: &MATMUL_NF4_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_NF4_COOP16, half: &MATMUL_NF4_HALF }),
    narrow: None,
};
const Q4_0: Family = Family {
    portable: &MATMUL_Q4_0,
    simd8: &MATMUL_Q4_0_SIMD8,
    tile128: &MATMUL_Q4_0_T128,
    tile64: &MATMUL_Q4_0_T64,
    coop8: &MATMUL_Q4_0_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_Q4_0_COOP16, half: &MATMUL_Q4_0_HALF }),
    narrow: None,
};
const Q4_1: Family = Family {
    portable: &MATMUL_Q4_1,
    simd8: &MATMUL_Q4_1_SIMD8,
    tile128: &MATMUL_Q4_1_T128,
    tile64: &MATMUL_Q4_1_T64,
    coop8: &MATMUL_Q4_1_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_Q4_1_COOP16, half: &MATMUL_Q4_1_HALF }),
    narrow: None,
};
const DENSE_DX: Family = Family {
    portable: &MATMUL_BACKWARD,
    simd8: &MATMUL_BACKWARD_SIMD8,
    tile128: &MATMUL_BACKWARD_T128,
    tile64: &MATMUL_BACKWARD_T64,
    coop8: &MATMUL_BACKWARD_COOP8,
    f16: None,
    narrow: Some([&MATMUL_BACKWARD_NARROW, &MATMUL_BACKWARD_NARROW_ROWS]),
};
const F16_DX: Family = Family {
    portable: &MATMUL_F16_BACKWARD,
    simd8: &MATMUL_F16_BACKWARD_SIMD8,
    tile128: &MATMUL_F16_BACKWARD_T128,
    tile64: &MATMUL_F16_BACKWARD_T64,
    coop8: &MATMUL_F16_BACKWARD_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_F16_BACKWARD_COOP16, half: &MATMUL_F16_BACKWARD_HALF }),
    narrow: None,
};
const NF4_DX: Family = Family {
    portable: &MATMUL_NF4_BACKWARD,
    simd8: &MATMUL_NF4_BACKWARD_SIMD8,
    tile128: &MATMUL_NF4_BACKWARD_T128,
    tile64: &MATMUL_NF4_BACKWARD_T64,
    coop8: &MATMUL_NF4_BACKWARD_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_NF4_BACKWARD_COOP16, half: &MATMUL_NF4_BACKWARD_HALF }),
    narrow: None,
};
const Q4_0_DX: Family = Family {
    portable: &MATMUL_Q4_0_BACKWARD,
    simd8: &MATMUL_Q4_0_BACKWARD_SIMD8,
    tile128: &MATMUL_Q4_0_BACKWARD_T128,
    tile64: &MATMUL_Q4_0_BACKWARD_T64,
    coop8: &MATMUL_Q4_0_BACKWARD_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_Q4_0_BACKWARD_COOP16, half: &MATMUL_Q4_0_BACKWARD_HALF }),
    narrow: None,
};
const Q4_1_DX: Family = Family {
    portable: &MATMUL_Q4_1_BACKWARD,
    simd8: &MATMUL_Q4_1_BACKWARD_SIMD8,
    tile128: &MATMUL_Q4_1_BACKWARD_T128,
    tile64: &MATMUL_Q4_1_BACKWARD_T64,
    coop8: &MATMUL_Q4_1_BACKWARD_COOP8,
    f16: Some(F16Products { coop16: &MATMUL_Q4_1_BACKWARD_COOP16, half: &MATMUL_Q4_1_BACKWARD_HALF }),
    narrow: None,
};
const DENSE_DW: Family = Family {
    portable: &MATMUL_BACKWARD_W,
    simd8: &MATMUL_BACKWARD_W_SIMD8,
    tile128: &MATMUL_BACKWARD_W_T128,
    tile64: &MATMUL_BACKWARD_W_T64,
    coop8: &MATMUL_BACKWARD_W_COOP8,
    f16: None,
    narrow: Some([&MATMUL_BACKWARD_W_NARROW, &MATMUL_BACKWARD_W_NARROW_ROWS]),
};

/// What picks a many-row product's kernel: the adapter's family for it (the forward's or the
/// gradients'), its small-grid threshold ([`crate::gpu::Kernels::tile128_min_groups`]) and the
/// widest side it gives the narrow blocks ([`crate::gpu::Kernels::narrow_max`]).
#[derive(Clone, Copy)]
struct Pick {
    family: KernelFamily,
    min_groups: u32,
    narrow_max: u32,
}

/// The adapter's [`Pick`] for many-row products (`grads`: for gradients).
fn pick_of(ctx: &GpuContext, grads: bool) -> Pick {
    let k = &ctx.report.kernels;
    let family = if grads { k.matmul_grad } else { k.matmul };
    Pick { family, min_groups: k.tile128_min_groups, narrow_max: k.narrow_max }
}

/// The kernel of `family` for a many-row matmul as `pick` says: simd8 (32 x 32 outputs per
/// workgroup) when `simd_ok` says the shape suits it, coop16, half, coop8 or tile128 (128 x 128),
/// else portable (64 x 64). tile128 (and half, whose f16 products would leave most of a
/// 128 x 128 tile idle) gives a product with a side of at most `pick.narrow_max` (LoRA's) to its
/// dense kernels on 256 x 16 or 16 x 256 blocks (`.narrow`, `.narrow_rows`), and
/// a product whose grid would have fewer than `pick.min_groups` workgroups to its own kernel on
/// 64 x 64 blocks (tile64); the matrix units keep every product they run (a small grid's long
/// reduction is split instead). `constants`: the pipeline constants it is made with.
fn many_rows(
    pick: Pick,
    family: Family,
    simd_ok: bool,
    (rows, cols, red): (u32, u32, u32),
    constants: Constants,
) -> ManyRows {
    use KernelFamily::{Coop8, Coop16, Simd8, Tile128};
    let big = cols.div_ceil(128) * rows.div_ceil(128) >= pick.min_groups;
    let tiles128 = pick.family == Tile128 || pick.family.leaves_gradients_to_tile128();
    let narrow = family.narrow.filter(|_| tiles128 && rows.min(cols) <= pick.narrow_max);
    // The matrix units keep a narrow product; half leaves it to the narrow blocks.
    let f16 = family.f16.and_then(|k| k.of(pick.family)).filter(|_| pick.family == Coop16 || narrow.is_none());
    let (shader, (block_rows, block_cols), tiled) = match (pick.family, f16, narrow) {
        (Simd8, ..) if simd_ok => (family.simd8, (32, 32), false),
        (_, Some(f16), _) => (f16, (128, 128), true),
        (Coop8, ..) => (family.coop8, (128, 128), true),
        (.., Some([narrow_cols, _])) if cols <= rows => (narrow_cols, (256, 16), true),
        (.., Some([_, narrow_rows])) => (narrow_rows, (16, 256), true),
        _ if tiles128 && big => (family.tile128, (128, 128), true),
        _ if tiles128 => (family.tile64, (64, 64), true),
        _ => (family.portable, (64, 64), true),
    };
    let groups = [cols.div_ceil(block_cols), rows.div_ceil(block_rows), 1];
    ManyRows { shader, constants, groups, tiled, rows, cols, red }
}

/// The reduction step of every tiled core (`BK` in their WGSL): a fused LoRA B product's
/// columns start at the first step after K.
const TILE_STEP: usize = 16;

/// Below this many workgroups a tiled matmul splits its reduction (a large GPU runs a few
/// hundred such workgroups at once).
const SPLIT_TARGET_GROUPS: u32 = 512;
/// The shortest reduction slice a split gives one workgroup (8 steps of BK = 16).
const MIN_SLICE: u32 = 128;
const MAX_SPLITS: u32 = 64;

/// How many slices a tiled matmul's reduction is split into, and the length of each (a
/// multiple of BK = 16): enough workgroups for a large GPU, slices of at least
/// `MIN_SLICE`. (1, 0) means no split.
pub fn split_of(groups: u32, red: u32) -> (u32, u32) {
    if groups >= SPLIT_TARGET_GROUPS || red < 2 * MIN_SLICE {
        return (1, 0);
    }
    let want = SPLIT_TARGET_GROUPS.div_ceil(groups).min(red / MIN_SLICE).min(MAX_SPLITS);
    let slice = red.div_ceil(want).next_multiple_of(16);
    let splits = red.div_ceil(slice);
    if splits < 2 { (1, 0) } else { (splits, slice) }
}

/// Records a many-row matmul. `buffers` are the kernel's bindings after the params up to the
/// output: the last is the output and the one before it the bias binding (a dummy when
/// unused); `after_y` the bindings after the output. A tiled kernel with a small grid and a
/// long reduction runs in two dispatches: slices of the reduction into the context's scratch
/// buffer, then matmul_split_reduce.wgsl.
fn run_many_rows(
    ctx: &GpuContext,
    enc: &mut Encoder,
    k: ManyRows,
    p: MatmulParams,
    (buffers, after_y): (&[&wgpu::Buffer], &[&wgpu::Buffer]),
    cost: Cost,
) -> Result<()> {
    let (splits, slice) = if k.tiled { split_of(k.groups[0] * k.groups[1], k.red) } else { (1, 0) };
    let list = k.constants.list();
    let constants = list.get();
    if splits < 2 {
        let all = [buffers, after_y].concat();
        return ctx.dispatch_costed(
            enc,
            Dispatch { shader: k.shader, buffers: &all, groups: k.groups, constants },
            &p,
            cost,
        );
    }
    let (rows, cols) = (k.rows as usize, k.cols as usize);
    let scratch = ctx.split_scratch(splits as usize * rows * cols)?;
    // The slices go to the scratch buffer whole; the reduction writes the output as asked
    // (scattered rows too).
    let partial = MatmulParams {
        split_k: slice,
        alpha: 1.0,
        has_bias: 0,
        accumulate: 0,
        y_stride: k.cols,
        y_col_offset: 0,
        y_seg_rows: 0,
        ..p
    };
    let n = buffers.len();
    let mut bound = [buffers, after_y].concat();
    bound[n - 1] = &scratch;
    // The slices write splits partial outputs instead of one; the reduction reads them back.
    let partials = 4.0 * (splits as usize * rows * cols) as f64;
    let out_bytes = 4.0 * (rows * cols) as f64 * if p.accumulate != 0 { 2.0 } else { 1.0 };
    let sliced = Cost { flops: cost.flops, bytes: cost.bytes - out_bytes + partials };
    let groups = [k.groups[0], k.groups[1], splits];
    ctx.dispatch_costed(enc, Dispatch { shader: k.shader, buffers: &bound, groups, constants }, &partial, sliced)?;
    let reduce = MatmulParams { m: k.rows, n: k.cols, k: splits, ..p };
    let quads = u32_of(rows * cols.div_ceil(4), "outputs")?;
    let reduce_buffers = [&scratch, buffers[n - 2], buffers[n - 1]];
    let groups = groups_1d(quads.div_ceil(64));
    let d = Dispatch { shader: &MATMUL_SPLIT_REDUCE, buffers: &reduce_buffers, groups, constants: &[] };
    let reduced = Cost { flops: (splits as usize * rows * cols) as f64, bytes: partials + out_bytes };
    ctx.record(enc, d, bytemuck::bytes_of(&reduce), reduced, false)
}

/// A linear layer's input gradient: dy (m, n) times w (n, k) into the columns of dx that
/// `out` says.
#[derive(Debug, Clone, Copy)]
pub struct MatmulGrad<'a> {
    /// The output's gradient: m rows, n columns read.
    pub dy: DyCols<'a>,
    /// (n, k) weight.
    pub w: Weight<'a>,
    /// The input's gradient (see `out`).
    pub dx: &'a wgpu::Buffer,
    /// Rows (tokens).
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Where in dx the result goes, and how.
    pub out: OutCols,
}

/// Input gradient of a linear layer: dx[m, col_offset + k] (+)= alpha * dy[m, :N] . w[:, k],
/// w (N, K). The weight itself gets no gradient here (frozen base, or see
/// [`matmul_backward_w`]).
pub fn matmul_backward(ctx: &GpuContext, enc: &mut Encoder, g: MatmulGrad<'_>) -> Result<()> {
    backward(ctx, enc, g, None, None)
}

/// A LoRA adapter's dh A that a many-row input gradient sums as more of its reduction
/// ([`matmul_backward_lora`]): `dx += dh[m, :] . A[:, k]`, the n rows of A gathered from up to
/// three blocks of the adapter's buffer (the A matrices of the modules that read one input).
#[derive(Debug, Clone, Copy)]
pub struct LoraDx<'a> {
    /// (m, n) dh, contiguous.
    pub dh: &'a wgpu::Buffer,
    /// Its columns, the rows of the gathered A.
    pub n: usize,
    /// The adapter's flat parameters, holding the A matrices ((rows, K) each).
    pub params: &'a wgpu::Buffer,
    /// The first block's first element.
    pub first: usize,
    /// Rows a block, and the first elements of blocks 1 and 2.
    pub gather: Gather,
}

/// [`matmul_backward`] of two rows or more with a LoRA adapter's dh A fused in:
/// `dx[m, col_offset + k] (+)= alpha * dy[m, :N] . w[:, k] + dh[m, :] . A[:, k]`. dh's columns
/// are more of the reduction, after dy's, so the base weight's input gradient and the
/// adapter's take one dispatch and one pass over dx instead of two: training's backward pass
/// runs the last module of each group that reads one input so. Refused: one row, an alpha of
/// 0, a dh short of its rows and blocks of A rows that do not fit.
pub fn matmul_backward_lora(ctx: &GpuContext, enc: &mut Encoder, g: MatmulGrad<'_>, lora: LoraDx<'_>) -> Result<()> {
    let bad = |what: String| Err(Error::invalid("input gradient with a LoRA dh A", what));
    if g.m < 2 {
        return bad("fuses dh A into the gradient of two rows or more".into());
    }
    if !g.out.alpha.is_normal() {
        return bad(format!("sums dh A before alpha scales the sum, so alpha cannot be {}", g.out.alpha));
    }
    if lora.n == 0 || 4 * (g.m * lora.n) as u64 > lora.dh.size() {
        return bad(format!("dh holds fewer than {} rows of {} values", g.m, lora.n));
    }
    let LoraDx { first, gather: Gather { rows, offsets }, .. } = lora;
    let ends = [first, offsets[0], offsets[1]].map(|o| 4 * (o + rows * g.k) as u64);
    if rows == 0 || lora.n > 3 * rows || ends.iter().any(|&e| e > lora.params.size()) {
        return bad(format!("{} rows of A gathered in blocks of {rows} do not fit", lora.n));
    }
    backward(ctx, enc, g, None, Some(lora))
}

/// [`matmul_backward`] through a [`Weight::DenseAt`] whose rows (the reduction's) are gathered
/// as `gather` says: dx (+)= dh W with W's rows from up to three blocks. Training's dx through
/// the A matrices of the modules that read one input, as one product.
pub fn matmul_backward_gathered(ctx: &GpuContext, enc: &mut Encoder, g: MatmulGrad<'_>, gather: Gather) -> Result<()> {
    // The weight's rows are the reduction here: n of them, k long.
    let as_forward = Matmul { x: g.dy.buf, w: g.w, bias: None, y: g.dx, m: g.m, n: g.n, k: g.k, out: g.out };
    check_gather(as_forward, gather).map_err(|e| Error::invalid("gathered matmul gradient", e))?;
    backward(ctx, enc, g, Some(gather), None)
}

fn backward(
    ctx: &GpuContext,
    enc: &mut Encoder,
    g: MatmulGrad<'_>,
    gather: Option<Gather>,
    lora: Option<LoraDx<'_>>,
) -> Result<()> {
    if let Some([hi, lo]) = g.w.planes() {
        backward(ctx, enc, MatmulGrad { w: hi, ..g }, gather, lora)?;
        return backward(ctx, enc, MatmulGrad { w: lo, out: g.out.accumulated(), ..g }, gather, None);
    }
    let MatmulGrad { dy, w, dx, m, n, k, out } = g;
    let mut p = matmul_params(m, n, k, out)?;
    p.dy_stride = u32_of(dy.stride, "dy stride")?;
    p.dy_col_offset = u32_of(dy.col_offset, "dy column")?;
    let mut aligned = [n, k, dy.stride, dy.col_offset].iter().all(|v| v.is_multiple_of(4));
    if let Some(g) = gather {
        p.seg_rows = u32_of(g.rows, "rows a block")?;
        p.w_offset1 = u32_of(g.offsets[0], "weight offset")?;
        p.w_offset2 = u32_of(g.offsets[1], "weight offset")?;
        aligned = aligned && g.offsets.iter().all(|o| o.is_multiple_of(4));
    }
    let g = dy.buf;
    let mut block = None;
    let (family, simd_ok, buffers): (Family, bool, Vec<&wgpu::Buffer>) = match w {
        Weight::Dense(w) => (DENSE_DX, true, vec![g, w, g, dx]),
        Weight::DenseAt(w, offset) => {
            p.w_offset = u32_of(offset, "weight offset")?;
            (DENSE_DX, offset.is_multiple_of(4), vec![g, w, g, dx])
        }
        Weight::F16(w) => {
            check_f16(k)?;
            (F16_DX, true, vec![g, w, g, dx])
        }
        Weight::Nf4 { packed, absmax, block_size } => {
            block = Some(block_constant(k, block_size)?);
            (NF4_DX, true, vec![g, packed, absmax, g, dx])
        }
        Weight::Q4_0 { packed, scales } => {
            block = Some(block_constant(k, Q4_0_BLOCK)?);
            (Q4_0_DX, true, vec![g, packed, scales, g, dx])
        }
        Weight::Q4_1 { packed, coeffs, block_size } => {
            block = Some(block_constant(k, block_size)?);
            (Q4_1_DX, true, vec![g, packed, coeffs, g, dx])
        }
        Weight::Planes { .. } => return Err(Error::invalid("matmul", "two planes reach one kernel")),
    };
    let mut cost = matmul_cost(m, n, k, w.bytes(n, k), (m * n, m * k), out.accumulate);
    let mut red = p.n;
    if let Some(l) = lora {
        // dh's columns follow dy's in the reduction, from the step after N.
        red = u32_of(n.next_multiple_of(TILE_STEP) + l.n, "reduction")?;
        p.lora_rank = u32_of(l.n, "dh columns")?;
        p.lora_h_stride = p.lora_rank;
        p.lora_b = u32_of(l.first, "A offset")?;
        p.lora_seg_rows = u32_of(l.gather.rows, "rows a block")?;
        p.lora_w1 = u32_of(l.gather.offsets[0], "A offset")?;
        p.lora_w2 = u32_of(l.gather.offsets[1], "A offset")?;
        p.lora_scale = 1.0 / out.alpha;
        cost.flops += 2.0 * (m * k * l.n) as f64;
        cost.bytes += 4.0 * ((m + k) * l.n) as f64;
    }
    let constants = Constants { block, rows_lora: false };
    // The narrow blocks take steps of 8, where a fused dh A's columns start at one of 16.
    let family = if lora.is_some() { Family { narrow: None, ..family } } else { family };
    let kernel = many_rows(pick_of(ctx, true), family, aligned && simd_ok, (p.m, p.k, red), constants);
    // After dx: dh and the A matrices; dy the dummy.
    let after_y = [lora.map_or(g, |l| l.dh), lora.map_or(g, |l| l.params)];
    run_many_rows(ctx, enc, kernel, p, (&buffers, &after_y), cost)
}

/// A dense linear layer's weight gradient: dy (m, n) transposed times x (m, k), scaled by
/// `alpha`, into dw at element `dw_offset` (added to it when `accumulate`).
#[derive(Debug, Clone, Copy)]
pub struct WeightGrad<'a> {
    /// (m, n) the output's gradient.
    pub dy: &'a wgpu::Buffer,
    /// (m, k) the forward's input.
    pub x: &'a wgpu::Buffer,
    /// The flat buffer the (n, k) gradient goes into.
    pub dw: &'a wgpu::Buffer,
    /// Its first element there.
    pub dw_offset: usize,
    /// Rows (tokens) summed over.
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The factor of the result.
    pub alpha: f32,
    /// Add to dw rather than overwrite it.
    pub accumulate: bool,
}

/// Weight gradient of a dense linear layer, into a flat buffer:
/// dw[offset + n*K + k] (+)= alpha * sum_m dy[m, n] * x[m, k]; dy (M, N), x (M, K) contiguous.
pub fn matmul_backward_w(ctx: &GpuContext, enc: &mut Encoder, g: WeightGrad<'_>) -> Result<()> {
    weight_grad(ctx, enc, g, WeightGradCols::default())
}

/// Where [`matmul_backward_w_cols`] reads dy's and x's rows: each `(row stride, first column)`
/// where it is a block of columns of a wider matrix, `None` where it is contiguous; and the op
/// applied to x as it is loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightGradCols<'a> {
    /// dy's rows (N values each read).
    pub dy: Option<(usize, usize)>,
    /// x's rows (K values each read).
    pub x: Option<(usize, usize)>,
    /// The gated activation read as x ([`RowInput::SiluMul`], [`RowInput::GeluMul`]: x the
    /// gate, up laid out as x): down_proj's LoRA A gradient, for which the backward pass then
    /// writes no gated rows. Or the normed rows read through the norm with its kept 1 / rms
    /// ([`RowInput::RmsNormKept`]: x the norm's input): the A gradients of the modules after a
    /// norm, for which the backward pass norms nothing again.
    pub x_input: Option<RowInput<'a>>,
    /// dw's rows in blocks of `rows`, scattered: block 0 at `dw_offset`, blocks 1 and 2 at the
    /// offsets (each block's rows `k` apart). The A gradients of up to three LoRA modules that
    /// read one input, as one product over their shared dh, each block where its A lies.
    pub dw_rows: Option<Gather>,
}

/// [`matmul_backward_w`] reading dy and x as blocks of columns of wider matrices (training's
/// LoRA gradients of one module out of the h and dh that the modules reading one input share),
/// and x through the op `cols.x_input`.
pub fn matmul_backward_w_cols(
    ctx: &GpuContext,
    enc: &mut Encoder,
    g: WeightGrad<'_>,
    cols: WeightGradCols<'_>,
) -> Result<()> {
    for (what, buf, width, at) in [("dy", g.dy, g.n, cols.dy), ("x", g.x, g.k, cols.x)] {
        if let Some((stride, col)) = at
            && (col + width > stride || 4 * ((g.m.max(1) - 1) * stride + col + width) as u64 > buf.size())
        {
            return Err(Error::invalid(
                "weight gradient",
                format!(
                    "{} rows of {width} {what} columns from column {col} with a row stride of {stride} do not fit",
                    g.m
                ),
            ));
        }
    }
    if let Some(input) = cols.x_input {
        let (stride, col) = cols.x.unwrap_or((g.k, 0));
        let end = (g.m.max(1) - 1) * stride + col + g.k;
        let why = match input {
            RowInput::RmsNorm { .. } => Some(
                "reads x through a norm only with its rows' kept 1 / rms (RmsNormKept), not their sums".to_string(),
            ),
            RowInput::RmsNormKept { w, inv_rms } => {
                if w.size() < 4 * g.k as u64 {
                    Some(format!("the norm's weight holds fewer than the {} values of a row", g.k))
                } else if inv_rms.size() < 4 * g.m as u64 {
                    Some(format!("the kept 1 / rms holds fewer than the {} rows", g.m))
                } else {
                    None
                }
            }
            RowInput::SiluMul { up } | RowInput::GeluMul { up } => (up.size() < 4 * end as u64)
                .then(|| format!("the up projection holds fewer than the {end} values the gate's rows reach")),
        };
        if let Some(why) = why {
            return Err(Error::invalid("weight gradient", why));
        }
    }
    if let Some(rows) = cols.dw_rows
        && !blocks_fit(g.dw_offset, rows, (g.n, g.k), g.dw.size())
    {
        return Err(Error::invalid(
            "weight gradient",
            format!("{} rows of dw scattered in blocks of {} do not fit", g.n, rows.rows),
        ));
    }
    weight_grad(ctx, enc, g, cols)
}

fn weight_grad(ctx: &GpuContext, enc: &mut Encoder, g: WeightGrad<'_>, cols: WeightGradCols<'_>) -> Result<()> {
    let WeightGrad { dy, x, dw, dw_offset, m, n, k, alpha, accumulate } = g;
    let out = OutCols { stride: k, col_offset: dw_offset, alpha, accumulate };
    let mut p = matmul_params(m, n, k, out)?;
    let (dy_cols, x_cols) = (cols.dy.unwrap_or((n, 0)), cols.x.unwrap_or((k, 0)));
    p.dy_stride = u32_of(dy_cols.0, "dy stride")?;
    p.dy_col_offset = u32_of(dy_cols.1, "dy column")?;
    p.x_stride = u32_of(x_cols.0, "x stride")?;
    p.x_col_offset = u32_of(x_cols.1, "x column")?;
    if let Some(rows) = cols.dw_rows {
        p.y_seg_rows = u32_of(rows.rows, "rows a block")?;
        p.y_offset1 = u32_of(rows.offsets[0], "block offset")?;
        p.y_offset2 = u32_of(rows.offsets[1], "block offset")?;
    }
    let aligned = [n, k, dy_cols.0, dy_cols.1, x_cols.0, x_cols.1].iter().all(|v| v.is_multiple_of(4));
    let mut cost = matmul_cost(m, n, k, 4.0 * (m * n) as f64, (m * k, n * k), accumulate);
    // simd8 reads x through the op in a variant for the gates and one for the norm; the other
    // families' loaders branch on p.x_op. Unused operands bind x as a dummy.
    let (family, aux, rows) = match cols.x_input {
        Some(input @ RowInput::RmsNormKept { inv_rms, .. }) => {
            let (op, w) = input.op();
            p.x_op = op;
            cost.bytes += 4.0 * (m + k) as f64;
            (Family { simd8: &MATMUL_BACKWARD_W_SIMD8_NORMED, ..DENSE_DW }, w, inv_rms)
        }
        Some(input) => {
            let (op, up) = input.op();
            p.x_op = op;
            cost.bytes += 4.0 * (m * k) as f64;
            (Family { simd8: &MATMUL_BACKWARD_W_SIMD8_GATED, ..DENSE_DW }, up, x)
        }
        None => (DENSE_DW, x, x),
    };
    let kernel = many_rows(pick_of(ctx, true), family, aligned, (p.n, p.k, p.m), Constants::default());
    run_many_rows(ctx, enc, kernel, p, (&[dy, x, dy, dw], &[aux, rows]), cost)
}

/// The adapters of a batch whose rows each carry their own (gathered LoRA, `lora_rows.wgsl`):
/// every resident adapter's A and B matrices in one buffer, and a table of four words a row
/// and module, (A's first element, B's first element, rank, scale bits), rank 0 for a row
/// without the module's adapter. A module's entries are consecutive, one a row.
#[derive(Debug, Clone, Copy)]
pub struct RowsAdapters<'a> {
    /// Every resident adapter's A (rank, n_in) and B (n_out, rank) matrices.
    pub w: &'a wgpu::Buffer,
    /// The entries (every entry's matrices must lie in `w`).
    pub table: &'a wgpu::Buffer,
    /// The (first) module's first entry.
    pub table_row: usize,
    /// A module's columns in h: at least every row's rank.
    pub width: usize,
}

/// The operands of [`lora_rows_a`].
#[derive(Debug, Clone, Copy)]
pub struct LoraRowsA<'a> {
    /// The modules' input, (rows, n_in).
    pub x: &'a wgpu::Buffer,
    /// The rows' adapters; the modules' entries follow each other, `rows` apart.
    pub adapters: RowsAdapters<'a>,
    /// Modules that read x (q, k and v: 3).
    pub modules: usize,
    /// The output, (rows, modules * width).
    pub h: &'a wgpu::Buffer,
    /// Rows of the batch.
    pub rows: usize,
    /// The modules' input features.
    pub n_in: usize,
}

/// The B products that [`matmul_rows_lora_forward`] adds: row t's x A^T from `h[t * h_stride +
/// h_col ..]`, as [`lora_rows_a`] wrote it.
#[derive(Debug, Clone, Copy)]
pub struct RowsB<'a> {
    /// The rows' adapters, this module's entries from `table_row`.
    pub adapters: RowsAdapters<'a>,
    /// The rows' x A^T.
    pub h: &'a wgpu::Buffer,
    /// This module's first column in h.
    pub h_col: usize,
    /// h's row stride.
    pub h_stride: usize,
}

/// The params of `modules` modules' `rows` rows, with their table entries checked.
fn rows_params(
    (rows, modules): (usize, usize),
    (n_in, n_out): (usize, usize),
    a: RowsAdapters<'_>,
) -> Result<LoraRowsParams> {
    if rows == 0 || modules == 0 || a.width == 0 {
        let what = format!("{modules} modules of {rows} rows with a slot width of {}: none may be 0", a.width);
        return Err(Error::invalid("gathered LoRA", what));
    }
    let entries = (a.table.size() / 16) as usize;
    if entries < a.table_row + modules * rows {
        return Err(Error::invalid(
            "gathered LoRA",
            format!(
                "{modules} modules of {rows} rows with ranks up to {} from entry {}: the adapter table holds {entries} entries",
                a.width, a.table_row
            ),
        ));
    }
    Ok(LoraRowsParams {
        n_rows: u32_of(rows, "rows")?,
        n_in: u32_of(n_in, "inputs")?,
        n_out: u32_of(n_out, "outputs")?,
        width: u32_of(a.width, "rank")?,
        table_row: u32_of(a.table_row, "table row")?,
        modules: u32_of(modules, "modules")?,
        h_stride: 0,
        h_col: 0,
    })
}

/// Why `rows` rows of h from column `col` with a row stride of `stride` and `width` columns a
/// row do not fit h, if they do not.
fn check_h(h: &wgpu::Buffer, rows: usize, (col, width, stride): (usize, usize, usize)) -> Result<()> {
    if col + width > stride || 4 * ((rows - 1) * stride + col + width) as u64 > h.size() {
        return Err(Error::invalid(
            "gathered LoRA",
            format!(
                "{rows} rows of {width} from column {col} with a row stride of {stride}: h holds {} values",
                h.size() / 4
            ),
        ));
    }
    Ok(())
}

/// Gathered LoRA's A products (`lora_rows.wgsl`): `h[t, i * width + j] = x[t, :] . A_ti[j, :]`
/// for each of `modules` modules that read x, each row t through its own adapter's A as the
/// table gives it, 0 past the row's rank (and for a row without the module's adapter). One
/// dispatch for the modules together.
pub fn lora_rows_a(ctx: &GpuContext, enc: &mut Encoder, a: LoraRowsA<'_>) -> Result<()> {
    let LoraRowsA { x, adapters, modules, h, rows, n_in } = a;
    let mut p = rows_params((rows, modules), (n_in, 0), adapters)?;
    let stride = modules * adapters.width;
    if 4 * (rows * n_in) as u64 > x.size() {
        let what = format!("{rows} rows of {n_in}: x holds {} values", x.size() / 4);
        return Err(Error::invalid("gathered LoRA", what));
    }
    check_h(h, rows, (0, stride, stride))?;
    p.h_stride = u32_of(stride, "h")?;
    let (r, c) = (rows as f64, stride as f64);
    let cost = Cost { flops: 2.0 * r * c * n_in as f64, bytes: 4.0 * (r * n_in as f64 * (1.0 + c) + r * c) };
    let groups = [p.modules * p.width, p.n_rows, 1];
    let d = Dispatch { shader: &LORA_ROWS_A, buffers: &[x, adapters.w, adapters.table, h], groups, constants: &[] };
    ctx.dispatch_costed(enc, d, &p, cost)
}

/// Gathered LoRA's B products added to a whole (rows, n_out) y by their own dispatch
/// (`lora_rows.wgsl`): `y[t] += scale_t h_t B_t^T`.
fn lora_rows_b(
    ctx: &GpuContext,
    enc: &mut Encoder,
    b: RowsB<'_>,
    y: &wgpu::Buffer,
    (rows, n_out): (usize, usize),
) -> Result<()> {
    let mut p = rows_params((rows, 1), (0, n_out), b.adapters)?;
    (p.h_stride, p.h_col) = (u32_of(b.h_stride, "h")?, u32_of(b.h_col, "h")?);
    let (r, w) = (rows as f64, b.adapters.width as f64);
    let cost = Cost { flops: 2.0 * r * w * n_out as f64, bytes: 4.0 * (r * w + r * n_out as f64 * (2.0 + w)) };
    let groups = [p.n_out.div_ceil(64), p.n_rows, 1];
    let d =
        Dispatch { shader: &LORA_ROWS_B, buffers: &[b.h, b.adapters.w, b.adapters.table, y], groups, constants: &[] };
    ctx.dispatch_costed(enc, d, &p, cost)
}

/// [`matmul_forward`] of two rows or more whose rows each add their own adapter's B product
/// (gathered LoRA): `y[t, n] (+)= x[t, :] . w[n, :] (+ bias[n]) + scale_t * h[t, h_col + (0 ..
/// rank_t)] . B_t[n, :]`, with h from [`lora_rows_a`]. One dispatch where the kernel, made with
/// the pipeline constant `ROWS_LORA`, sums it with the base product (common/lora_table.wgsl:
/// the simd8 kernels always, the tiled ones where rows * width is at most K), else the product
/// and then `lora_rows.wgsl`'s B entry. Refused: one row (a row's own adapter is a [`LoraB`]
/// for [`matvec_fused_forward`]), an alpha other than 1, an output that is not whole rows, an h
/// or table that does not fit.
pub fn matmul_rows_lora_forward(ctx: &GpuContext, enc: &mut Encoder, mm: Matmul<'_>, b: RowsB<'_>) -> Result<()> {
    let bad = |what: &str| Err(Error::invalid("matmul with gathered LoRA", what.to_string()));
    if mm.m < 2 {
        return bad("reads one row: give matvec_fused_forward the row's adapter as a LoraB");
    }
    if mm.out.alpha != 1.0 || mm.out.stride != mm.n || mm.out.col_offset != 0 {
        return bad("writes whole rows of y with alpha 1 (the rows' scales are applied as they are)");
    }
    rows_params((mm.m, 1), (mm.k, mm.n), b.adapters)?;
    check_h(b.h, mm.m, (b.h_col, b.adapters.width, b.h_stride))?;
    let a = b.adapters;
    let lora = LoraB {
        h: b.h,
        h_offset: b.h_col,
        h_stride: b.h_stride,
        params: a.w,
        b_offset: a.table_row,
        rank: a.width,
        scale: 1.0,
    };
    forward(ctx, enc, mm, Fused { lora: Some(lora), ..Fused::default() }, Reads { x_cols: None, table: Some(a.table) })
}
