//! NF4 quantization, bit-exact with bitsandbytes (`quantize_4bit(quant_type="nf4")`).
//!
//! Layout: the tensor is flattened row-major and cut into blocks of `block_size` values (the last
//! block may be shorter). Each block stores one f32 absmax; each value stores the 4-bit index of
//! the nearest NF4 code to `value / absmax`. Two indices share a byte, the FIRST element in the
//! HIGH nibble. Dequantization is `NF4_CODE[q] * absmax`.
//!
//! Rounding follows bitsandbytes exactly: full blocks scale by the reciprocal of absmax
//! (`x * (1/absmax)`), a trailing partial block divides, and the index is the number of code
//! midpoints strictly below the scaled value (`torch.bucketize`, so a tie goes to the lower code).

/// The NF4 code book (bitsandbytes `get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)] // the literals exactly as bitsandbytes prints them
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The default NF4 block size (bitsandbytes' default).
pub const DEFAULT_BLOCK_SIZE: usize = 64;

/// A tensor quantized to NF4, as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Row-major shape of the original tensor.
    pub shape: Vec<usize>,
    /// Values per absmax (64 by default, as bitsandbytes).
    pub block_size: usize,
    /// Two 4-bit indices per byte, first element in the high nibble; `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    /// One absmax per block.
    pub absmax: Vec<f32>,
}

fn midpoints() -> [f32; 15] {
    let mut m = [0f32; 15];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    m
}

/// Index of the NF4 code for an already-scaled value in [-1, 1]: how many midpoints lie strictly
/// below it. The midpoints ascend, so counting all that do gives the count that stopping at the
/// first that does not gives, with no branch on the value (NaN is above none: 0).
#[inline(always)]
fn bucket(scaled: f32, mids: &[f32; 15]) -> u8 {
    mids.iter().map(|&m| u8::from(m < scaled)).sum()
}

/// Valid block sizes (bitsandbytes accepts powers of two from 32 to 4096).
pub fn check_block_size(block_size: usize) -> Result<(), String> {
    if block_size.is_power_of_two() && (32..=4096).contains(&block_size) {
        Ok(())
    } else {
        Err(format!("NF4 block size {block_size} must be a power of two in 32..=4096"))
    }
}

/// Quantizes a row-major tensor to NF4. A large tensor is cut into runs of whole blocks that
/// the CPU's cores quantize side by side (each block's bytes depend on that block alone, so
/// the result is the same however it is cut).
pub fn quantize(data: &[f32], shape: &[usize], block_size: usize) -> Result<Nf4Tensor, String> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(format!("shape {shape:?} holds {n} values but {} were given", data.len()));
    }
    quantize_from(shape, block_size, |first, out| {
        out.copy_from_slice(&data[first..first + out.len()]);
        Ok(())
    })
}

/// Values a core holds in f32 at a time in [`quantize_from`]: 256 KiB, a whole number of
/// blocks of any valid size.
const CHUNK: usize = 1 << 16;

/// [`quantize`] of a tensor whose values `values(first, out)` writes into `out`, from value
/// `first` on: a source in another format (bf16, f16, ggml blocks) is decoded a chunk of 64 Ki
/// values at a time on each core, never whole in f32 (`first` is always a multiple of 64 Ki).
/// The first error `values` returns is the result.
pub fn quantize_from(
    shape: &[usize],
    block_size: usize,
    values: impl Fn(usize, &mut [f32]) -> Result<(), String> + Sync,
) -> Result<Nf4Tensor, String> {
    check_block_size(block_size)?;
    let n: usize = shape.iter().product();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(block_size)];
    // Runs of whole chunks (so of whole blocks, an even number of values: a run's bytes start
    // at a whole byte), unless one run takes the whole tensor: every `values` call starts a
    // multiple of 64 Ki values in, on a block of any ggml type.
    let run = (crate::prim::units_a_run(absmax.len(), n) * block_size).next_multiple_of(CHUNK);
    let jobs = packed.chunks_mut(run / 2).zip(absmax.chunks_mut(run / block_size)).enumerate().collect();
    crate::prim::try_parallel(jobs, |(i, (p, a)): (usize, (&mut [u8], &mut [f32]))| {
        let (first, len) = (i * run, run.min(n - i * run));
        let mut chunk = vec![0f32; CHUNK.min(len)];
        for at in (0..len).step_by(CHUNK) {
            let v = &mut chunk[..CHUNK.min(len - at)];
            values(first + at, v)?;
            quantize_run(v, block_size, &mut p[at / 2..], &mut a[at / block_size..]);
        }
        Ok(())
    })?;
    Ok(Nf4Tensor { shape: shape.to_vec(), block_size, packed, absmax })
}

/// [`quantize_run_portable`] in the widest vectors the CPU has: on x86-64, AVX2's 8 lanes
/// where the CPU has them (the baseline's SSE2 has 4), each code found by a binary search
/// ([`nf4_codes_avx2`]). The same products and exact compares, so the same bytes.
fn quantize_run(data: &[f32], block_size: usize, packed: &mut [u8], absmax: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { quantize_run_avx2(data, block_size, packed, absmax) };
    }
    quantize_run_portable(data, block_size, packed, absmax)
}

/// [`quantize_run_portable`] for AVX2: full blocks through [`nf4_codes_avx2`], a short last
/// block as the portable loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_run_avx2(data: &[f32], block_size: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let mids = midpoints();
    let full = data.len() / block_size;
    let (whole, rest) = data.split_at(full * block_size);
    let (whole_packed, rest_packed) = packed.split_at_mut(full * block_size / 2);
    let (whole_absmax, rest_absmax) = absmax.split_at_mut(full);
    let blocks = whole.chunks_exact(block_size).zip(whole_packed.chunks_exact_mut(block_size / 2));
    for ((block, bytes), am_out) in blocks.zip(whole_absmax) {
        let am = block_absmax(block);
        *am_out = am;
        nf4_codes_avx2(block, 1.0 / am.max(1e-38), &mids, bytes);
    }
    quantize_run_portable(rest, block_size, rest_packed, rest_absmax);
}

/// The NF4 codes of `block` (a multiple of 16 values) scaled by `inv`, packed two a byte
/// (the first value in the high nibble) into `bytes`. Each code is how many midpoints lie
/// strictly below the scaled value, as [`bucket`] counts them, found as its four bits by a
/// binary search over the ascending midpoints, 8 values a vector: is m7 below the value (bit
/// 3), then m3 or m11 (bit 2), then one of m1, m5, m9, m13 (bit 1), then one of the even ones
/// (bit 0), each picked by the bits so far. The portable loop's clamp to [-1, 1] is left out:
/// every midpoint lies inside, so a value above 1 has all 15 below it and one below -1 none,
/// clamped or not, and a NaN has none.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nf4_codes_avx2(block: &[f32], inv: f32, mids: &[f32; 15], bytes: &mut [u8]) {
    use std::arch::x86_64::*;
    let m = mids;
    let (m7, m3, m11) = (_mm256_set1_ps(m[7]), _mm256_set1_ps(m[3]), _mm256_set1_ps(m[11]));
    let quarters = _mm256_setr_ps(m[1], m[5], m[9], m[13], 0.0, 0.0, 0.0, 0.0);
    let evens = _mm256_setr_ps(m[0], m[2], m[4], m[6], m[8], m[10], m[12], m[14]);
    let (inv, one) = (_mm256_set1_ps(inv), _mm256_set1_epi32(1));
    // 1 where the midpoint `t` lies strictly below `s`, else 0.
    let below = |t: __m256, s: __m256| _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(t, s)), one);
    let codes = |x: &[f32]| {
        // SAFETY: `x` holds 8 floats (a chunk of 8 below); an unaligned load reads exactly them.
        let x = unsafe { _mm256_loadu_ps(x.as_ptr()) };
        let s = _mm256_mul_ps(x, inv);
        let b3 = below(m7, s);
        let b2 = below(_mm256_blendv_ps(m3, m11, _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_setzero_si256(), b3))), s);
        let i2 = _mm256_add_epi32(_mm256_add_epi32(b3, b3), b2);
        let i1 = _mm256_add_epi32(_mm256_add_epi32(i2, i2), below(_mm256_permutevar8x32_ps(quarters, i2), s));
        let c = _mm256_add_epi32(_mm256_add_epi32(i1, i1), below(_mm256_permutevar8x32_ps(evens, i1), s));
        _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c))
    };
    for (x, out) in block.chunks_exact(16).zip(bytes.chunks_exact_mut(8)) {
        // 16 codes as bytes; as 16-bit lanes each holds a pair, the first value's code low.
        let pairs = _mm_packus_epi16(codes(&x[..8]), codes(&x[8..]));
        let first = _mm_slli_epi16::<4>(_mm_and_si128(pairs, _mm_set1_epi16(0x00FF)));
        let packed = _mm_packus_epi16(_mm_or_si128(first, _mm_srli_epi16::<8>(pairs)), _mm_setzero_si128());
        let mut eight = [0u8; 16];
        // SAFETY: `eight` holds 16 bytes, what an unaligned 128-bit store writes.
        unsafe { _mm_storeu_si128(eight.as_mut_ptr().cast(), packed) };
        out.copy_from_slice(&eight[..8]);
    }
}

/// Quantizes `data` (whole blocks of `block_size`, the last possibly shorter) into `packed`
/// (half as many bytes, rounded up) and `absmax` (one a block). Full blocks scale by the
/// reciprocal of absmax and a short one divides, as bitsandbytes; an odd count's last byte has
/// code 0.0's index in its low nibble. Inlined into its callers, so each compiles it for its
/// own instruction set.
#[inline(always)]
fn quantize_run_portable(data: &[f32], block_size: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let mids = midpoints();
    let mut codes = vec![0u8; block_size];
    for ((block, bytes), am_out) in data.chunks(block_size).zip(packed.chunks_mut(block_size / 2)).zip(absmax) {
        let am = block_absmax(block);
        *am_out = am;
        let am = am.max(1e-38);
        let codes = &mut codes[..block.len()];
        // Straight loops over the block, which the compiler turns into vector instructions.
        if block.len() == block_size {
            let inv = 1.0 / am;
            codes.iter_mut().zip(block).for_each(|(c, &x)| *c = bucket((x * inv).clamp(-1.0, 1.0), &mids));
        } else {
            codes.iter_mut().zip(block).for_each(|(c, &x)| *c = bucket((x / am).clamp(-1.0, 1.0), &mids));
        }
        for (pair, byte) in codes.chunks(2).zip(bytes) {
            let low = if pair.len() == 2 { pair[1] } else { bucket(0.0, &mids) };
            *byte = (pair[0] << 4) | low;
        }
    }
}

/// The largest magnitude in `block` (0 for an empty one; NaN ignored, as `f32::max` does),
/// taken over eight lanes: the maximum of a set is the same in any order.
#[inline(always)]
fn block_absmax(block: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut whole = block.chunks_exact(8);
    for c in &mut whole {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x.abs());
        }
    }
    whole.remainder().iter().chain(&lanes).fold(0f32, |a, &x| a.max(x.abs()))
}

impl Nf4Tensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The 4-bit index of element `i`.
    #[inline]
    pub fn index(&self, i: usize) -> u8 {
        let b = self.packed[i / 2];
        if i.is_multiple_of(2) { b >> 4 } else { b & 0xF }
    }

    /// Dequantizes to f32 (`NF4_CODE[q] * absmax`, as bitsandbytes does in f32).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.len()).map(|i| NF4_CODE[self.index(i) as usize] * self.absmax[i / self.block_size]).collect()
    }
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), used for double
/// quantization of the absmax values.
pub fn dynamic_map_signed() -> [f32; 256] {
    let (max_exp, non_sign) = (7i32, 7i32);
    let mut data: Vec<f64> = Vec::with_capacity(256);
    let linspace = |n: usize| -> Vec<f32> {
        // torch.linspace(0.1, 1, n) in f32, as ATen's vectorized CPU kernel computes it: a fused
        // multiply-add from the start for the first half and from the end for the second.
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (n as f32 - 1.0);
        let half = n / 2;
        (0..n)
            .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
            .collect()
    };
    let additional = 2i32.pow((non_sign - max_exp) as u32) - 1;
    for i in 0..max_exp {
        let items = 2usize.pow((i + non_sign - max_exp) as u32) + 1;
        let b = linspace(items);
        // torch multiplies the f32 means by the Python scale in f32.
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for sign in [1.0f32, -1.0] {
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(f64::from(sign * scale * mean));
            }
        }
    }
    debug_assert_eq!(additional, 0);
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(f64::total_cmp);
    let mut out = [0f32; 256];
    for (o, v) in out.iter_mut().zip(data) {
        *o = v as f32;
    }
    out
}

/// Double-quantized absmax values (bitsandbytes `compress_statistics=True`).
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// Mean of the absmax values, subtracted before quantizing.
    pub offset: f32,
    /// One 8-bit index into [`dynamic_map_signed`] per absmax value.
    pub codes: Vec<u8>,
    /// One f32 scale per block of `block_size` absmax values.
    pub absmax2: Vec<f32>,
    /// Absmax values per f32 scale (bitsandbytes uses 256).
    pub block_size: usize,
}

/// Quantizes absmax values with bitsandbytes' blockwise 8-bit dynamic quantization.
pub fn double_quantize(absmax: &[f32], block_size: usize) -> DoubleQuant {
    // torch's f32 mean sums in an unspecified order; an f64 sum is within one ulp of it.
    let offset = (absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    double_quantize_with_offset(absmax, offset, block_size)
}

/// [`double_quantize`] around a given offset.
pub fn double_quantize_with_offset(absmax: &[f32], offset: f32, block_size: usize) -> DoubleQuant {
    let code = dynamic_map_signed();
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let mut codes = Vec::with_capacity(centred.len());
    let mut absmax2 = Vec::new();
    for block in centred.chunks(block_size) {
        let am = block.iter().fold(0f32, |a, &x| a.max(x.abs()));
        absmax2.push(am);
        for &x in block {
            let s = (x / am).clamp(-1.0, 1.0);
            codes.push(nearest(&code, s));
        }
    }
    DoubleQuant { offset, codes, absmax2, block_size }
}

/// Index of the code nearest to `x` in a sorted code book; ties go to the lower index.
fn nearest(code: &[f32; 256], x: f32) -> u8 {
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &c) in code.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

impl DoubleQuant {
    /// The absmax values as bitsandbytes reconstructs them: `code[q] * absmax2 + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = dynamic_map_signed();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| code[q as usize] * self.absmax2[i / self.block_size] + self.offset)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_element_is_the_high_nibble() {
        let mut x = vec![0f32; 64];
        x[0] = -1.0; // code 0
        x[1] = 1.0; // code 15
        let q = quantize(&x, &[64], 64).expect("valid");
        assert_eq!(q.packed[0], 0x0F);
        assert_eq!(q.absmax, vec![1.0]);
        assert_eq!(q.dequantize()[..2], [-1.0, 1.0]);
    }

    #[test]
    fn every_code_round_trips() {
        let x: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * 2.0).collect();
        let q = quantize(&x, &[1, 64], 64).expect("valid");
        assert_eq!(q.dequantize(), x);
    }

    /// A tensor large enough to be cut into runs for several threads gives the bytes of the
    /// plain loop, one value at a time, that bitsandbytes' rounding is written as (the fixtures
    /// in `tests/quant_fixtures.rs` hold that loop's rounding to bitsandbytes' own output): an
    /// odd count, a short last block, zero blocks, ties on the midpoints, NaN and infinities.
    #[test]
    fn a_tensor_cut_into_runs_for_threads_quantizes_as_the_plain_loop() {
        fn plain(data: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
            let mids = midpoints();
            let (mut q, mut absmax) = (Vec::new(), Vec::new());
            for block in data.chunks(bs) {
                let am = block.iter().fold(0f32, |a, &x| a.max(x.abs()));
                absmax.push(am);
                let am = am.max(1e-38);
                let inv = 1.0 / am;
                for &x in block {
                    let s = if block.len() == bs { x * inv } else { x / am }.clamp(-1.0, 1.0);
                    q.push(mids.iter().take_while(|&&m| m < s).count() as u8);
                }
            }
            if q.len() % 2 == 1 {
                q.push(7);
            }
            (q.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect(), absmax)
        }
        let mids = midpoints();
        for (n, bs) in [(2_000_037, 64), ((1 << 20) + 4096 * 3, 4096), (3_000_001, 32)] {
            let mut state = n as u64;
            let mut data: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
                })
                .collect();
            // A block of zeros, a block whose values sit on the midpoints and one ulp from them
            // on either side (absmax 1), and values no block should carry but a file may.
            data[bs..2 * bs].fill(0.0);
            for (i, x) in data[2 * bs..3 * bs].iter_mut().enumerate() {
                let m = mids[i / 3 % 15];
                *x = match (i, i % 3) {
                    (0, _) => 1.0,
                    (_, 0) => m,
                    (_, 1) => f32::from_bits(m.to_bits() + 1),
                    _ => f32::from_bits(m.to_bits() - 1),
                };
            }
            data[5 * bs + 3] = f32::NAN;
            data[7 * bs + 1] = f32::INFINITY;
            data[9 * bs + 2] = f32::NEG_INFINITY;
            let q = quantize(&data, &[n], bs).expect("valid");
            let (packed, absmax) = plain(&data, bs);
            assert_eq!(q.absmax.len(), absmax.len(), "n {n}, block {bs}: absmax count");
            if let Some(i) = (0..absmax.len()).find(|&i| q.absmax[i].to_bits() != absmax[i].to_bits()) {
                panic!("n {n}, block {bs}: absmax {i} is {}, the plain loop's {}", q.absmax[i], absmax[i]);
            }
            assert_eq!(q.packed.len(), packed.len(), "n {n}, block {bs}: packed length");
            if let Some(i) = (0..packed.len()).find(|&i| q.packed[i] != packed[i]) {
                panic!("n {n}, block {bs}: byte {i} is {:#04x}, the plain loop's {:#04x}", q.packed[i], packed[i]);
            }
            // The baseline build too, which a CPU with wider vectors does not run above.
            let (mut base_packed, mut base_absmax) = (vec![0u8; packed.len()], vec![0f32; absmax.len()]);
            quantize_run_portable(&data, bs, &mut base_packed, &mut base_absmax);
            let same_absmax = base_absmax.iter().zip(&absmax).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(base_packed == packed && same_absmax, "n {n}, block {bs}: the baseline build differs");
        }
    }

    /// A source's error is the result, whichever run meets it; the others stop.
    #[test]
    fn a_source_that_fails_is_the_error() {
        let r = quantize_from(&[3_000_000], 64, |first, out| {
            if first + out.len() > 2_000_000 {
                return Err(format!("value {first} is unreadable"));
            }
            out.fill(0.5);
            Ok(())
        });
        assert!(matches!(&r, Err(e) if e.ends_with("is unreadable")), "{:?}", r.as_ref().err());
    }

    #[test]
    fn bad_block_size_and_shape_are_errors() {
        assert!(quantize(&[0.0; 10], &[10], 48).is_err());
        assert!(quantize(&[0.0; 10], &[11], 64).is_err());
    }
}
