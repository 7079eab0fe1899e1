//! Naive CPU twins of every GPU kernel: the oracle the kernel tests compare against. Written for
//! clarity, not speed; each mirrors the arithmetic order of its WGSL kernel where it matters.
//! The backward twins live in `backward` and are re-exported here, so that
//! `reference::rms_norm_backward` sits next to `reference::rms_norm_forward`.

mod backward;
pub use backward::*;

/// `out[t, :] = table[ids[t], :]`.
pub fn embedding_forward(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter().flat_map(|&id| table[id as usize * dim..(id as usize + 1) * dim].iter().copied()).collect()
}

/// y = x * rsqrt(mean(x^2) + eps) * w, per row.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, wi)| wi * (v * inv))
        })
        .collect()
}

/// (cos, sin) table for positions 0..max_pos: `[pos * half + i] = (cos, sin)(pos * inv_freq[i])`,
/// with the angle rounded to f32 first, as transformers does.
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

/// In-place RoPE (rotate_half layout over the first `rot_dim` values of each head, the rest
/// passed) on x (T, n_heads * head_dim); token t at `positions[t]`.
pub fn rope_forward(
    x: &mut [f32],
    table: &[[f32; 2]],
    n_heads: usize,
    (head_dim, rot_dim): (usize, usize),
    positions: &[usize],
) {
    let half = rot_dim / 2;
    for (th, head) in x.chunks_mut(head_dim).enumerate() {
        let pos = positions[th / n_heads];
        for i in 0..half {
            let [c, s] = table[pos * half + i];
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
        }
    }
}

/// silu(gate) * up.
pub fn silu_mul_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// gelu(gate) * up with GELU's tanh approximation: gelu(g) = g / 2 * (1 + tanh(sqrt(2 / pi) *
/// (g + 0.044715 g^3))), computed in f64.
pub fn gelu_mul_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (gelu_tanh(f64::from(g)) * f64::from(u)) as f32).collect()
}

pub(crate) fn gelu_tanh(g: f64) -> f64 {
    0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
}

/// The value an activation keeps when it is stored at half precision (`f16_pack.wgsl`): x
/// rounded to the nearest f16 (ties to even), an infinity past 65504 (from 65520 on), NaN kept.
pub fn round_to_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

/// Chris Wellons' lowbias32 integer hash (as in `dropout.wgsl`).
pub fn lowbias32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The keep threshold (p * 2^32, so that a uniform u32 hash is kept with probability 1 - p) and
/// the scale 1 / (1 - p) of inverted dropout.
pub fn dropout_threshold(p: f32) -> (u32, f32) {
    let threshold = (f64::from(p) * 4_294_967_296.0).round().min(f64::from(u32::MAX)) as u32;
    (threshold, 1.0 / (1.0 - p))
}

/// Inverted dropout in place: element i kept when lowbias32(i ^ lowbias32(seed)) >= p * 2^32,
/// and scaled by 1 / (1 - p).
pub fn dropout(x: &mut [f32], p: f32, seed: u32) {
    let (threshold, scale) = dropout_threshold(p);
    let s = lowbias32(seed);
    for (i, v) in x.iter_mut().enumerate() {
        *v = if lowbias32(i as u32 ^ s) >= threshold { *v * scale } else { 0.0 };
    }
}

/// y += x.
pub fn add_forward(x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// y = x w^T (+ bias); x (M, K), w (N, K).
pub fn matmul_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for l in 0..k {
                acc += x[i * k + l] * w[j * k + l];
            }
            y[i * n + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// One row's adapter in the gathered LoRA twin: A (rank, n_in) at `a` and B (n_out, rank) at
/// `b` in the adapters' shared parameters, and the factor of B A; rank 0 for none.
#[derive(Debug, Clone, Copy)]
pub struct LoraRow {
    /// A's first element.
    pub a: usize,
    /// B's first element.
    pub b: usize,
    /// The rank: A's rows and B's columns.
    pub rank: usize,
    /// The factor of B A.
    pub scale: f32,
}

/// Gathered LoRA's A products: for each module i of `modules` (each a row's slices), `h[t, i *
/// width + j] = x[t] . A_ti[j]` for j below row t's rank, 0 up to `width`; x (rows, n_in), h
/// (rows, modules * width).
pub fn lora_rows_a(x: &[f32], w: &[f32], modules: &[&[LoraRow]], (n_in, width): (usize, usize)) -> Vec<f32> {
    let rows = modules.first().map_or(0, |m| m.len());
    let stride = modules.len() * width;
    let mut h = vec![0.0; rows * stride];
    for (i, module) in modules.iter().enumerate() {
        for (t, r) in module.iter().enumerate() {
            let xt = &x[t * n_in..(t + 1) * n_in];
            for j in 0..r.rank {
                let a = &w[r.a + j * n_in..r.a + (j + 1) * n_in];
                h[t * stride + i * width + j] = xt.iter().zip(a).map(|(x, a)| x * a).sum();
            }
        }
    }
    h
}

/// Gathered LoRA's B products: `y[t] += scale_t h_t B_t^T`, row t's x A^T from `h[t * h_stride
/// + h_col ..]` (its rank of values), y (rows, n_out).
pub fn lora_rows_b(
    h: &[f32],
    (h_col, h_stride): (usize, usize),
    w: &[f32],
    rows: &[LoraRow],
    n_out: usize,
    y: &mut [f32],
) {
    for (t, r) in rows.iter().enumerate() {
        let ht = &h[t * h_stride + h_col..t * h_stride + h_col + r.rank];
        for o in 0..n_out {
            let bo = &w[r.b + o * r.rank..r.b + (o + 1) * r.rank];
            y[t * n_out + o] += r.scale * ht.iter().zip(bo).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// The heads and options of the attention twins.
#[derive(Debug, Clone, Copy)]
pub struct AttentionCase {
    /// Query heads.
    pub n_heads: usize,
    /// Key and value heads.
    pub n_kv_heads: usize,
    /// Width of a head; scores are scaled by 1 / sqrt(head_dim).
    pub head_dim: usize,
    /// Position of the first query (0 for a training batch).
    pub pos_offset: usize,
    /// Gemma 2's soft cap: a scaled score s becomes cap · tanh(s / cap).
    pub softcap: Option<f32>,
}

impl AttentionCase {
    /// A scaled score, soft-capped when the case caps.
    pub fn capped(&self, s: f32) -> f32 {
        self.softcap.map_or(s, |c| c * (s / c).tanh())
    }
}

/// Causal GQA attention: q (T, H*hd) at positions pos_offset.., k/v (P, Hkv*hd) for positions
/// 0..P; query t sees keys `key_start[t] ..= pos_offset + t`.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], key_start: &[usize], c: AttentionCase) -> Vec<f32> {
    let AttentionCase { n_heads, n_kv_heads, head_dim, pos_offset, .. } = c;
    let t_count = q.len() / (n_heads * head_dim);
    let kv_stride = n_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    for t in 0..t_count {
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv_heads);
            let qv = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let n_keys = pos_offset + t + 1;
            let first = key_start[t];
            let scores: Vec<f32> = (first..n_keys)
                .map(|j| {
                    c.capped(
                        qv.iter()
                            .zip(&k[j * kv_stride + kvh * head_dim..][..head_dim])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * scale,
                    )
                })
                .collect();
            let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f32 = e.iter().sum();
            let o = &mut out[(t * n_heads + h) * head_dim..][..head_dim];
            for (w, j) in e.iter().zip(first..) {
                for (d, od) in o.iter_mut().enumerate() {
                    *od += w / sum * v[j * kv_stride + kvh * head_dim + d];
                }
            }
        }
    }
    out
}

/// Attention of rows that are each one query of its own sequence, all sequences' keys and values
/// in `k` and `v`: row i of `q` attends to keys `ranges[i].0 .. ranges[i].1` (as the last query of
/// [`attention_forward`] over them does) into row i of `out`; a row with an empty range keeps
/// what `out` held. `c.pos_offset` is not read.
pub fn attention_rows_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ranges: &[(usize, usize)],
    c: AttentionCase,
    out: &mut [f32],
) {
    let width = c.n_heads * c.head_dim;
    for (i, &(first, end)) in ranges.iter().enumerate() {
        if first < end {
            let one = AttentionCase { pos_offset: end - 1, ..c };
            out[i * width..][..width].copy_from_slice(&attention_forward(
                &q[i * width..][..width],
                k,
                v,
                &[first],
                one,
            ));
        }
    }
}

/// A pass's keys (or values), rows of `width`, written into a cache at positions `at[i]` (`None`:
/// row i is not written).
pub fn kv_write(rows: &[f32], width: usize, at: &[Option<usize>], cache: &mut [f32]) {
    for (row, &at) in rows.chunks(width).zip(at) {
        if let Some(j) = at {
            cache[j * width..][..width].copy_from_slice(row);
        }
    }
}

/// Gemma 2's final logit soft cap: each x becomes cap · tanh(x / cap).
pub fn logit_softcap(x: &[f32], cap: f32) -> Vec<f32> {
    x.iter().map(|&v| cap * (v / cap).tanh()).collect()
}

/// Per-row softmax cross-entropy; a target of `u32::MAX` scores 0.
pub fn cross_entropy_forward(logits: &[f32], targets: &[u32], vocab: usize) -> Vec<f32> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            if t == u32::MAX || t as usize >= vocab {
                return 0.0;
            }
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = row.iter().map(|v| f64::from(v - mx).exp()).sum::<f64>().ln() as f32 + mx;
            lse - row[t as usize]
        })
        .collect()
}

/// AdamW's bias corrections `(1 - beta1^t, 1 - beta2^t)` for 1-based step `t`, computed in f64
/// and rounded once, as torch does with Python floats.
pub fn adamw_bias_corrections(beta1: f32, beta2: f32, step: u32) -> (f32, f32) {
    let t = i32::try_from(step).unwrap_or(i32::MAX);
    ((1.0 - f64::from(beta1).powi(t)) as f32, (1.0 - f64::from(beta2).powi(t)) as f32)
}

/// The index of the largest value: the first of equal maxima, NaN never chosen, 0 when no value
/// exceeds -infinity (greedy decoding; twin of `argmax.wgsl`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best.0
}

/// The global L2 norm of a gradient buffer (accumulated in f64).
pub fn grad_norm(g: &[f32]) -> f32 {
    g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32
}

/// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when
/// max_norm is 0 (no clipping).
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 }
}

/// One AdamW step (torch.optim.AdamW semantics, see `shaders/adamw.wgsl`), in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    (beta1, beta2): (f32, f32),
    eps: f32,
    weight_decay: f32,
    step: u32,
    grad_scale: f32,
) {
    let (c1, c2) = adamw_bias_corrections(beta1, beta2, step);
    for i in 0..param.len() {
        let g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g;
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
        let decayed = param[i] * (1.0 - lr * weight_decay);
        let denom = v[i].sqrt() / c2.sqrt() + eps;
        param[i] = decayed - (lr / c1) * (m[i] / denom);
    }
}
