//! Choosing the next token on the GPU, so that decoding reads back an id, not a row of logits.

use super::*;

/// Workgroups of the first argmax pass over n values; its partials buffer holds two words
/// (value bits, index) for each.
pub fn argmax_groups(n: usize) -> usize {
    n.div_ceil(4096).clamp(1, 256)
}

/// out[0] = the index of the largest of the n values of x (the lowest among equal maxima; NaN
/// never chosen; 0 when none exceeds -infinity), through `partials` (2 * argmax_groups(n) words).
pub fn argmax(
    ctx: &GpuContext,
    enc: &mut Encoder,
    x: &wgpu::Buffer,
    partials: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    let g = argmax_groups(n);
    if partials.size() < (2 * g * 4) as u64 || x.size() < (n * 4) as u64 {
        return Err(Error::invalid(
            "argmax",
            format!("{n} values need {} bytes of partials (got {})", 2 * g * 4, partials.size()),
        ));
    }
    let p1 = ArgmaxParams { n: u32_of(n, "values")?, final_pass: 0, n_groups: g as u32, _pad: 0 };
    ctx.dispatch(enc, &ARGMAX, &p1, &[x, partials], [g as u32, 1, 1])?;
    let p2 = ArgmaxParams { n: g as u32, final_pass: 1, n_groups: 1, _pad: 0 };
    ctx.dispatch(enc, &ARGMAX, &p2, &[partials, out], [1, 1, 1])
}
