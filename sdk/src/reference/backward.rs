//! CPU twins of the backward kernels. Each takes the forward's inputs and the output gradient
//! and returns the input gradients; tests check them against central finite differences of
//! the forward twins, and the GPU kernels against them.

/// The gradient through [`super::logit_softcap`]: dx = dz · (1 - (z / cap)^2), from the capped
/// values z = cap · tanh(x / cap) (what the cross-entropy's backward reads).
pub fn logit_softcap_backward(dz: &[f32], z: &[f32], cap: f32) -> Vec<f32> {
    dz.iter().zip(z).map(|(&g, &v)| g * (1.0 - (v / cap) * (v / cap))).collect()
}

/// Fused softmax cross-entropy: per-row loss and dlogits = grad_scale * (softmax - onehot);
/// a target of `u32::MAX` gives loss 0 and a zero gradient row.
pub fn cross_entropy_backward(logits: &[f32], targets: &[u32], vocab: usize, grad_scale: f32) -> (Vec<f32>, Vec<f32>) {
    cross_entropy_backward_weighted(logits, targets, vocab, grad_scale, &vec![1.0; targets.len()])
}

/// [`cross_entropy_backward`] with row t's gradient also multiplied by `weights[t]`.
pub fn cross_entropy_backward_weighted(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    grad_scale: f32,
    weights: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut loss = Vec::with_capacity(targets.len());
    let mut grad = vec![0f32; logits.len()];
    for (((row, &t), g), &w) in logits.chunks(vocab).zip(targets).zip(grad.chunks_mut(vocab)).zip(weights) {
        if t == u32::MAX || t as usize >= vocab {
            loss.push(0.0);
            continue;
        }
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = row.iter().map(|v| f64::from(v - mx).exp()).sum::<f64>();
        loss.push(sum.ln() as f32 + mx - row[t as usize]);
        let scale = grad_scale * w;
        for (gi, &v) in g.iter_mut().zip(row) {
            *gi = (f64::from(v - mx).exp() / sum) as f32 * scale;
        }
        g[t as usize] -= scale;
    }
    (loss, grad)
}

/// How [`dpo_loss`] scores a pair (the twin's own copy of the kernel's settings).
#[derive(Debug, Clone, Copy)]
pub struct DpoTwin {
    /// The reference's strength.
    pub beta: f64,
    /// Coefficient of -log sigmoid(beta h).
    pub a: f64,
    /// Coefficient of -log sigmoid(-beta h).
    pub b: f64,
    /// (h - 1 / (2 beta))^2 instead.
    pub ipo: bool,
    /// Log-ratios divided by the completion's scored tokens.
    pub length_normalized: bool,
}

impl DpoTwin {
    /// A pair's loss and its derivative by h, the difference of the (normalized) log-ratios.
    pub fn loss(&self, h: f64) -> (f64, f64) {
        let log_sigmoid = |x: f64| x.min(0.0) - (-x.abs()).exp().ln_1p();
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        if self.ipo {
            let d = h - 1.0 / (2.0 * self.beta);
            (d * d, 2.0 * d)
        } else {
            let z = self.beta * h;
            (
                -self.a * log_sigmoid(z) - self.b * log_sigmoid(-z),
                self.beta * (-self.a * sigmoid(-z) + self.b * sigmoid(z)),
            )
        }
    }
}

/// DPO over the pairs of a packed batch, as `dpo.wgsl`: `spans[i]` holds the chosen rows (from
/// `spans[i][0]` to `spans[i][1]`), the rejected rows (`[2]` to `[3]`) and the scored tokens of
/// each (`[4]`, `[5]`); `ce` the per-row cross-entropies; `reference` the (chosen, rejected) log-probabilities of each pair. Returns
/// the per-row weights (grad_scale x d loss / d ce) and per pair (loss, chosen reward, rejected
/// reward, chosen log-prob, rejected log-prob), in f64.
pub fn dpo_loss(
    ce: &[f32],
    spans: &[[u32; 6]],
    reference: &[f32],
    how: DpoTwin,
    grad_scale: f64,
) -> (Vec<f64>, Vec<[f64; 5]>) {
    let mut weights = vec![0f64; ce.len()];
    let mut stats = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        let sum = |a: u32, b: u32| -ce[a as usize..b as usize].iter().map(|&l| f64::from(l)).sum::<f64>();
        let (pc, pr) = (sum(s[0], s[1]), sum(s[2], s[3]));
        let (rc, rr) = (pc - f64::from(reference[2 * i]), pr - f64::from(reference[2 * i + 1]));
        let (nc, nr) =
            if how.length_normalized { (f64::from(s[4]).max(1.0), f64::from(s[5]).max(1.0)) } else { (1.0, 1.0) };
        let (loss, dh) = how.loss(rc / nc - rr / nr);
        stats.push([loss, how.beta * rc, how.beta * rr, pc, pr]);
        weights[s[0] as usize..s[1] as usize].fill(-dh / nc * grad_scale);
        weights[s[2] as usize..s[3] as usize].fill(dh / nr * grad_scale);
    }
    (weights, stats)
}

/// dx = dy w for y = x w^T: dy (M, N), w (N, K) -> dx (M, K).
pub fn matmul_backward(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * k];
    for i in 0..m {
        for j in 0..n {
            let g = dy[i * n + j];
            for l in 0..k {
                dx[i * k + l] += g * w[j * k + l];
            }
        }
    }
    dx
}

/// dw = dy^T x for y = x w^T: dy (M, N), x (M, K) -> dw (N, K).
pub fn matmul_backward_w(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dw = vec![0f32; n * k];
    for i in 0..m {
        for j in 0..n {
            let g = dy[i * n + j];
            for l in 0..k {
                dw[j * k + l] += g * x[i * k + l];
            }
        }
    }
    dw
}

/// dx of y = rms_norm(x) * w (w frozen), per row.
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut dx = vec![0f32; x.len()];
    for ((row, g), out) in x.chunks(dim).zip(dy.chunks(dim)).zip(dx.chunks_mut(dim)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let dot: f32 = (0..dim).map(|i| w[i] * g[i] * row[i]).sum();
        let kk = dot * r * r * r / dim as f32;
        for i in 0..dim {
            out[i] = r * w[i] * g[i] - row[i] * kk;
        }
    }
    dx
}

/// In-place RoPE backward on dx (T, n_heads * head_dim): the inverse rotation of the first
/// `rot_dim` values of each head.
pub fn rope_backward(
    dx: &mut [f32],
    table: &[[f32; 2]],
    n_heads: usize,
    (head_dim, rot_dim): (usize, usize),
    positions: &[usize],
) {
    let half = rot_dim / 2;
    for (th, head) in dx.chunks_mut(head_dim).enumerate() {
        let pos = positions[th / n_heads];
        for i in 0..half {
            let [c, s] = table[pos * half + i];
            let (g1, g2) = (head[i], head[i + half]);
            head[i] = g1 * c + g2 * s;
            head[i + half] = g2 * c - g1 * s;
        }
    }
}

/// (dgate, dup) of out = silu(gate) * up.
pub fn silu_mul_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dout) {
        let s = 1.0 / (1.0 + (-g).exp());
        dup.push(d * g * s);
        dgate.push(d * u * s * (1.0 + g * (1.0 - s)));
    }
    (dgate, dup)
}

/// (dgate, dup) of out = gelu(gate) * up (tanh approximation), in f64.
pub fn gelu_mul_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dout) {
        let (g, u, d) = (f64::from(g), f64::from(u), f64::from(d));
        let t = (c * (g + 0.044715 * g * g * g)).tanh();
        dup.push((d * super::gelu_tanh(g)) as f32);
        dgate.push((d * u * (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g))) as f32);
    }
    (dgate, dup)
}

/// (dq, dk, dv) of causal GQA attention over a training batch (q, k, v all (T, ..), query t
/// sees keys `key_start[t] ..= t`; `c.pos_offset` is not read). With a soft cap, the gradient of
/// a capped score c · tanh(s / c) is that of the score times 1 - tanh²(s / c).
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_start: &[usize],
    dout: &[f32],
    c: super::AttentionCase,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let super::AttentionCase { n_heads, n_kv_heads, head_dim, .. } = c;
    let t_count = q.len() / (n_heads * head_dim);
    let kv_stride = n_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let dotp = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for (t, &first) in key_start.iter().enumerate().take(t_count) {
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv_heads);
            let qo = (t * n_heads + h) * head_dim;
            let qv = &q[qo..qo + head_dim];
            let g = &dout[qo..qo + head_dim];
            let keys: Vec<usize> = (first..=t).collect();
            let kv_at = |j: usize| j * kv_stride + kvh * head_dim;
            let raw: Vec<f32> = keys.iter().map(|&j| dotp(qv, &k[kv_at(j)..kv_at(j) + head_dim]) * scale).collect();
            let s: Vec<f32> = raw.iter().map(|&x| c.capped(x)).collect();
            // d capped / d raw for each key.
            let cap_grad: Vec<f32> =
                raw.iter().map(|&x| c.softcap.map_or(1.0, |cap| 1.0 - (x / cap).tanh().powi(2))).collect();
            let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f32 = e.iter().sum();
            let p: Vec<f32> = e.iter().map(|x| x / sum).collect();
            let mut out = vec![0f32; head_dim];
            for (&j, pj) in keys.iter().zip(&p) {
                for d in 0..head_dim {
                    out[d] += pj * v[kv_at(j) + d];
                }
            }
            let delta = dotp(g, &out);
            for ((&j, pj), cg) in keys.iter().zip(&p).zip(&cap_grad) {
                let dp = dotp(g, &v[kv_at(j)..kv_at(j) + head_dim]);
                let ds = pj * (dp - delta) * cg;
                for d in 0..head_dim {
                    dq[qo + d] += scale * ds * k[kv_at(j) + d];
                    dk[kv_at(j) + d] += scale * ds * qv[d];
                    dv[kv_at(j) + d] += pj * g[d];
                }
            }
        }
    }
    (dq, dk, dv)
}
