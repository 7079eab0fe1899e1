//! Choosing the next token on the GPU, so that decoding reads back an id, not a row of logits.

use super::*;

/// Workgroups of the first argmax pass over n values; its partials buffer holds two words
/// (value bits, index) for each.
pub fn argmax_groups(n: usize) -> usize {
    n.div_ceil(4096).clamp(1, 256)
}

/// `out[0]` = the index of the largest of the n values of x (the lowest among equal maxima; NaN
/// never chosen; 0 when none exceeds -infinity), through `partials` (2 * argmax_groups(n) words).
pub fn argmax(
    ctx: &GpuContext,
    enc: &mut Encoder,
    x: &wgpu::Buffer,
    partials: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    argmax_rows(ctx, enc, (x, partials, out), n, 1)
}

/// [`argmax`] of each of `rows` rows of n values in x: `out[r]` the index within row r, through
/// `partials` (2 * argmax_groups(n) words a row).
pub fn argmax_rows(
    ctx: &GpuContext,
    enc: &mut Encoder,
    (x, partials, out): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    n: usize,
    rows: usize,
) -> Result<()> {
    let g = argmax_groups(n);
    let words = |b: &wgpu::Buffer| (b.size() / 4) as usize;
    if words(partials) < 2 * g * rows || words(x) < n * rows || words(out) < rows || rows == 0 {
        return Err(Error::invalid(
            "argmax",
            format!(
                "{rows} rows of {n} values need {} words of values, {} of partials and {rows} out (got {}, {} and {})",
                n * rows,
                2 * g * rows,
                words(x),
                words(partials),
                words(out)
            ),
        ));
    }
    let r = u32_of(rows, "rows")?;
    let p1 = ArgmaxParams { n: u32_of(n, "values")?, final_pass: 0, n_groups: g as u32, _pad: 0 };
    ctx.dispatch(enc, &ARGMAX, &p1, &[x, partials], [g as u32, r, 1])?;
    let p2 = ArgmaxParams { n: g as u32, final_pass: 1, n_groups: 1, _pad: 0 };
    ctx.dispatch(enc, &ARGMAX, &p2, &[partials, out], [1, r, 1])
}

/// The most candidates [`top_k`] returns.
pub const MAX_TOP_K: usize = 256;

/// Workgroups of the first top-k pass over n values, and the values each takes.
fn top_k_split(n: usize) -> (usize, usize) {
    let groups = n.div_ceil(2048).clamp(1, 64);
    (groups, n.div_ceil(groups).max(1))
}

/// Words of the partials buffer of a top-k over n values: two per candidate of each group.
pub fn top_k_partials(n: usize, k: usize) -> usize {
    2 * top_k_split(n).0 * k
}

/// out[0 .. 2k] = the k largest of the n values of x as (value bits, index) pairs, largest
/// first, in the order of `f32::total_cmp`, the lower index first among equal values (an index
/// of u32::MAX where fewer than k exist), through `partials` ([`top_k_partials`] words).
pub fn top_k(
    ctx: &GpuContext,
    enc: &mut Encoder,
    x: &wgpu::Buffer,
    partials: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: usize,
    k: usize,
) -> Result<()> {
    top_k_rows(ctx, enc, (x, partials, out), (n, k), 1)
}

/// [`top_k`] of each of `rows` rows of n values in x: row r's k pairs at `out[2k r ..]`, its
/// indices within the row, through `partials` ([`top_k_partials`] words a row).
pub fn top_k_rows(
    ctx: &GpuContext,
    enc: &mut Encoder,
    (x, partials, out): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    (n, k): (usize, usize),
    rows: usize,
) -> Result<()> {
    if k == 0 || k > MAX_TOP_K {
        return Err(Error::invalid("top-k", format!("k must be in 1..={MAX_TOP_K} (got {k})")));
    }
    let (groups, chunk) = top_k_split(n);
    let need = |words: usize| (words * rows * 4) as u64;
    if rows == 0 || partials.size() < need(top_k_partials(n, k)) || out.size() < need(2 * k) || x.size() < need(n) {
        return Err(Error::invalid(
            "top-k",
            format!(
                "{k} of {n} values in {rows} rows need {} bytes of values, {} of partials and {} of output (got {}, \
                 {} and {})",
                need(n),
                need(top_k_partials(n, k)),
                need(2 * k),
                x.size(),
                partials.size(),
                out.size()
            ),
        ));
    }
    let r = u32_of(rows, "rows")?;
    let p1 = TopKParams { n: u32_of(n, "values")?, k: k as u32, final_pass: 0, chunk: u32_of(chunk, "values")? };
    ctx.dispatch(enc, &TOP_K, &p1, &[x, partials], [groups as u32, r, 1])?;
    let p2 = TopKParams { n: (groups * k) as u32, k: k as u32, final_pass: 1, chunk: 0 };
    ctx.dispatch(enc, &TOP_K, &p2, &[partials, out], [1, r, 1])
}
