// rms_norm.wgsl's `.keep` variant: each row's 1 / rms = rsqrt(mean(x^2) + eps) into `inv_rms`,
// so that a weight gradient can read the normed rows as x[m, k] * w[k] * inv_rms[m]
// (X_RMS_KEPT) without their being written again.

@group(0) @binding(4) var<storage, read_write> inv_rms: array<f32>;  // (N)

fn keep_inv(row: u32, inv: f32) { inv_rms[row] = inv; }
