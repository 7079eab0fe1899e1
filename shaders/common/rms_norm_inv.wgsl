// What rms_norm.wgsl does with each row's 1 / rms: nothing here; the `.keep` variant swaps in
// common/rms_norm_inv_kept.wgsl, which keeps it for the weight gradients that read the normed
// rows through the norm (X_RMS_KEPT).
fn keep_inv(row: u32, inv: f32) {}
