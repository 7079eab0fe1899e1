// One AdamW step over a flat parameter buffer, as torch.optim.AdamW computes it after
// torch.nn.utils.clip_grad_norm_:
//   clip = min(1, max_grad_norm / (norm + 1e-6))     (1 when max_grad_norm = 0)
//   g  = grad * grad_scale * clip
//   p *= 1 - lr * weight_decay                      (decoupled weight decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p -= (lr / bias_c1) * m / (sqrt(v) / sqrt(bias_c2) + eps)
// The update is number t = applied[0] + 1, counted on the GPU (adamw_commit.wgsl adds one after
// each update it applies), so the host need not wait to learn whether the last step was
// skipped. bias_c1 = 1 - beta1^t and bias_c2 = 1 - beta2^t come from a table the host computes
// in f64, as torch does: bias[2(t-1)], bias[2(t-1)+1].
struct AdamwParams {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    grad_scale: f32,
    max_grad_norm: f32,
    table_len: u32,   // pairs in bias
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: AdamwParams;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;  // (N)
@group(0) @binding(2) var<storage, read> grad: array<f32>;         // (N)
@group(0) @binding(3) var<storage, read_write> m: array<f32>;      // (N)
@group(0) @binding(4) var<storage, read_write> v: array<f32>;      // (N)
@group(0) @binding(5) var<storage, read> norm: array<f32>;         // (1) global gradient norm
@group(0) @binding(6) var<storage, read> applied: array<u32>;      // (1) updates applied so far
@group(0) @binding(7) var<storage, read> bias: array<f32>;         // (table_len, 2)
@group(0) @binding(8) var<storage, read> skip: array<u32>;         // (1) non-zero: a loss was not finite

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    // A NaN or infinite gradient norm, or a loss that was (finite_check.wgsl), skips the whole step: parameters and moments stay as
    // they were, and the host, which reads the norm back, reports the skipped step.
    // (adamw_commit.wgsl leaves the update count as it was.)
    let gn = norm[0];
    if ((bitcast<u32>(gn) & 0x7f800000u) == 0x7f800000u || skip[0] != 0u) { return; }
    let t = min(applied[0], p.table_len - 1u);
    let bias_c1 = bias[2u * t];
    let bias_c2 = bias[2u * t + 1u];
    var clip = 1.0;
    if (p.max_grad_norm > 0.0) { clip = min(1.0, p.max_grad_norm / (gn + 1e-6)); }
    let g = grad[i] * p.grad_scale * clip;
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let decayed = param[i] * (1.0 - p.lr * p.weight_decay);
    let denom = sqrt(vi) / sqrt(bias_c2) + p.eps;
    param[i] = decayed - (p.lr / bias_c1) * (mi / denom);
}
