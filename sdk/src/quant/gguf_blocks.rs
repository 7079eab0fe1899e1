//! CPU dequantization of GGUF/ggml tensor types, bit-exact with ggml's `dequantize_row_*`, and
//! quantization to the types edgetune writes, bit-exact with ggml's `quantize_row_*_ref`.
//!
//! Block layouts follow ggml's `ggml-common.h`. Every function takes the raw little-endian bytes
//! of a whole tensor and the number of elements, and checks the byte length before reading.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// The ggml tensor types edgetune reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32 4-bit values with an f16 scale.
    Q4_0,
    /// Blocks of 32 4-bit values with an f16 scale and minimum.
    Q4_1,
    /// Blocks of 32 5-bit values with an f16 scale (value = d · (q - 16)).
    Q5_0,
    /// Blocks of 32 5-bit values with an f16 scale and minimum.
    Q5_1,
    /// Blocks of 32 8-bit values with an f16 scale.
    Q8_0,
    /// Super-blocks of 256 4-bit values in 8 sub-blocks with 6-bit scales and minimums.
    Q4K,
    /// Super-blocks of 256 5-bit values in 8 sub-blocks with 6-bit scales and minimums.
    Q5K,
    /// Super-blocks of 256 6-bit values in 16 sub-blocks with 8-bit scales.
    Q6K,
}

/// Values in a K-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Maps ggml's numeric type id; `Err` carries a readable name for unsupported ids.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 => "IQ (importance) quant",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return Err(format!("ggml tensor type {name} (id {other})"));
            }
        })
    }

    /// The ggml name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Whether the GPU can hold this type's values as the file stores them, so `Quant::Gguf`
    /// keeps them: Q4_0 in its own kernels; Q4_1 and Q4_K through the Q4_1 kernels; Q8_0, Q5_0,
    /// Q5_1, Q5_K and Q6_K as two 4-bit [`Planes`].
    pub fn kept_on_gpu(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1 | Self::Q4K) || planes_block(self).is_some()
    }

    /// Bytes the GPU holds for `n` values of a type it keeps (see [`Self::kept_on_gpu`]): the
    /// 4-bit codes and an f32 scale a block of 32 for Q4_0, and a minimum too for Q4_1 and Q4_K
    /// (which the kernels read as Q4_1); two such planes for the others. `None` for types
    /// re-quantized on load.
    pub fn gpu_bytes(self, n: usize) -> Option<usize> {
        match self {
            Self::Q4_0 => Some(n / 2 + n / 32 * 4),
            Self::Q4_1 | Self::Q4K => Some(n / 2 + n / 32 * 8),
            other => planes_block(other).map(|b| Planes::gpu_bytes(b, n)),
        }
    }

    /// Bytes needed for `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (bv, bb) = self.block();
        if !n.is_multiple_of(bv) {
            return None;
        }
        (n / bv).checked_mul(bb)
    }
}

/// That `data` is exactly `n` values of `ty`, for the repacking functions.
fn check_blocks(ty: GgmlType, data: &[u8], n: usize) -> Result<(), String> {
    let name = ty.name();
    let need = ty.bytes_for(n).ok_or_else(|| format!("{n} values is not a whole number of {name} blocks"))?;
    if data.len() != need {
        return Err(format!("{} bytes for {n} {name} values; {need} expected", data.len()));
    }
    Ok(())
}

/// Q4_0 blocks (`n` values) as the GPU holds them: the 4-bit codes in NF4's packing (byte i
/// holds element 2i in its high nibble and 2i+1 in its low one; ggml keeps element j of a
/// block in the low nibble of byte j and element j + 16 in its high nibble) and each block's
/// f16 scale d as an f32, exactly. value = (q - 8) * d, as [`dequantize`] computes it.
pub fn q4_0_repacked(data: &[u8], n: usize) -> Result<Packed, String> {
    let [out] = repacked_in_runs(GgmlType::Q4_0, data, n, |run, [out]| {
        for b in run.chunks_exact(18) {
            out.1.push(h(b, 0));
            pack_nibbles(&b[2..18], &mut out.0);
        }
    })?;
    Ok(out)
}

/// Q4_1 blocks (`n` values) as the GPU holds them: the codes in NF4's packing (as
/// [`q4_0_repacked`]) and each block's f16 scale d and minimum m as two f32, exactly.
/// value = q * d + m, as [`dequantize`] computes it.
pub fn q4_1_repacked(data: &[u8], n: usize) -> Result<Packed, String> {
    let [out] = repacked_in_runs(GgmlType::Q4_1, data, n, |run, [out]| {
        for b in run.chunks_exact(20) {
            out.1.extend([h(b, 0), h(b, 2)]);
            pack_nibbles(&b[4..20], &mut out.0);
        }
    })?;
    Ok(out)
}

/// Q4_K super-blocks (`n` values) as the GPU holds Q4_1: each sub-block of 32 becomes a block
/// with the codes in NF4's packing and two f32 coefficients, d1 = d · scale and -m1 = -(dmin ·
/// min). Both products are exact in f32 (an f16 times a 6-bit integer), so q · d1 + (-m1) is
/// ggml's `d1 * q - m1` bit for bit, as [`dequantize`] computes it.
pub fn q4_k_repacked(data: &[u8], n: usize) -> Result<Packed, String> {
    let [out] = repacked_in_runs(GgmlType::Q4K, data, n, |run, [out]| {
        for b in run.chunks_exact(144) {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                out.1.extend([d * f32::from(sc), -(dmin * f32::from(m))]);
                // Sub-block 2k is the low nibbles of qs[32k..32k + 32], 2k + 1 their high nibbles.
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let code = |e: usize| if j % 2 == 0 { q[e] & 0xF } else { q[e] >> 4 };
                out.0.extend((0..16).map(|i| (code(2 * i) << 4) | code(2 * i + 1)));
            }
        }
    })?;
    Ok(out)
}

/// A tensor of 5-, 6- or 8-bit codes (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K) as the GPU holds it: two
/// planes in Q4_1's form (codes in NF4's packing, a scale and a minimum as two f32 a block of
/// `block` values). With each value written as u · s + m (u the code, 0..=255, s and m its
/// block's), the high plane holds u >> 4 with scale 16 · s and minimum m, the low plane u & 15
/// with scale s and minimum 0, so hi + lo = u · s + m: a linear layer is the sum of the two
/// planes' matmuls, each through the Q4_1 kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    /// Values a scale and minimum (32, or 16 for Q6_K).
    pub block: usize,
    /// The high four bits of each code: packed codes, then (scale, minimum) a block.
    pub hi: (Vec<u8>, Vec<f32>),
    /// The low four bits of each code, likewise (every minimum 0).
    pub lo: (Vec<u8>, Vec<f32>),
}

impl Planes {
    /// Bytes the GPU holds for `n` values so: two 4-bit planes and four f32 a block.
    pub fn gpu_bytes(block: usize, n: usize) -> usize {
        n + n / block * 16
    }
}

/// The block size of [`Planes`] for `ty`, or `None` for types held otherwise.
pub fn planes_block(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => Some(32),
        GgmlType::Q6K => Some(16),
        _ => None,
    }
}

/// `n` values of `ty` as [`Planes`]. Every scale and minimum is exact in f32 (an f16 times an
/// integer of at most 8 bits, or an f16), and so is each plane's value for Q8_0, Q5_0 and
/// Q6_K, whose minimum is a multiple of the scale: hi + lo is ggml's value bit for bit. For
/// the affine Q5_1 and Q5_K, 16 · s + m is rounded once, so the sum is within one rounding of
/// ggml's `d * q + m`.
pub fn planes_repacked(ty: GgmlType, data: &[u8], n: usize) -> Result<Planes, String> {
    let block = planes_block(ty).ok_or_else(|| format!("{} tensors are not held as two 4-bit planes", ty.name()))?;
    let [hi, lo] = repacked_in_runs(ty, data, n, |run, [hi, lo]| {
        // A block of codes u with its scale s and minimum m.
        let mut push = |s: f32, m: f32, u: &[u8]| {
            hi.1.extend([16.0 * s, m]);
            lo.1.extend([s, 0.0]);
            for p in u.chunks_exact(2) {
                hi.0.push(((p[0] >> 4) << 4) | (p[1] >> 4));
                lo.0.push(((p[0] & 0xF) << 4) | (p[1] & 0xF));
            }
        };
        match ty {
            GgmlType::Q8_0 => {
                for b in run.chunks_exact(34) {
                    let d = h(b, 0);
                    let u: [u8; 32] = std::array::from_fn(|i| (b[2 + i] as i8 as i16 + 128) as u8);
                    push(d, -128.0 * d, &u);
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (size, at) = if ty == GgmlType::Q5_0 { (22, 2) } else { (24, 4) };
                for b in run.chunks_exact(size) {
                    let d = h(b, 0);
                    let m = if ty == GgmlType::Q5_0 { -16.0 * d } else { h(b, 2) };
                    push(d, m, &q5_codes(&b[at..at + 4], &b[at + 4..at + 20]));
                }
            }
            GgmlType::Q5K => {
                for b in run.chunks_exact(176) {
                    for (d1, m1, u) in q5_k_sub_blocks(b) {
                        push(d1, -m1, &u);
                    }
                }
            }
            GgmlType::Q6K => {
                for b in run.chunks_exact(210) {
                    let (u, scales) = q6_k_codes(b);
                    for (chunk, s) in u.chunks_exact(16).zip(scales) {
                        push(s, -32.0 * s, chunk);
                    }
                }
            }
            // planes_block has refused the other types.
            _ => {}
        }
    })?;
    Ok(Planes { block, hi, lo })
}

/// 4-bit codes in NF4's packing and their blocks' f32 coefficients, as the GPU holds them.
pub type Packed = (Vec<u8>, Vec<f32>);

/// `P` planes of [`Packed`] from `data`, `n` values in whole blocks of `ty`: `repack` appends
/// a run of blocks to each plane. A large tensor is cut into runs that the CPU's cores repack
/// side by side, joined in order (each block's codes and coefficients depend on that block
/// alone, so the planes are the same however it is cut).
fn repacked_in_runs<const P: usize>(
    ty: GgmlType,
    data: &[u8],
    n: usize,
    repack: impl Fn(&[u8], &mut [Packed; P]) + Sync,
) -> Result<[Packed; P], String> {
    check_blocks(ty, data, n)?;
    let (values, bytes) = ty.block();
    let run = crate::prim::units_a_run(n / values, n);
    let mut parts: Vec<[Packed; P]> = data
        .chunks(run * bytes)
        .map(|d| std::array::from_fn(|_| (Vec::with_capacity(d.len() / bytes * values / 2), Vec::new())))
        .collect();
    let jobs = data.chunks(run * bytes).zip(parts.iter_mut()).collect();
    crate::prim::run_parallel(jobs, |(d, out): (&[u8], &mut [Packed; P])| repack(d, out));
    if parts.len() == 1
        && let Some(one) = parts.pop()
    {
        return Ok(one);
    }
    Ok(std::array::from_fn(|p| {
        let codes: Vec<&[u8]> = parts.iter().map(|part| part[p].0.as_slice()).collect();
        let coeffs: Vec<&[f32]> = parts.iter().map(|part| part[p].1.as_slice()).collect();
        (codes.concat(), coeffs.concat())
    }))
}

/// A Q5_K super-block's eight sub-blocks of 32: each one's scale d · sc and minimum dmin · m
/// (ggml's d1 and m1, exact products) and its 5-bit codes. Sub-block 2k is the low nibbles of
/// qs[32k..32k + 32], 2k + 1 their high nibbles; bit j of qh[l] is the fifth bit of element l of
/// sub-block j.
fn q5_k_sub_blocks(b: &[u8]) -> [(f32, f32, [u8; 32]); 8] {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    std::array::from_fn(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        let ql = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let u = std::array::from_fn(|l| {
            let low = if j % 2 == 0 { ql[l] & 0xF } else { ql[l] >> 4 };
            low | (((qh[l] >> j) & 1) << 4)
        });
        (d * f32::from(sc), dmin * f32::from(m), u)
    })
}

/// A Q6_K super-block's 6-bit codes (0..64, the value is scale · (code - 32)) in element order,
/// and the scale d · sc of each sub-block of 16. As ggml's dequantize_row_q6_K, element
/// 128 half + 32 k + l takes its low bits from ql[64 half + l + 32 (k % 2)] (the low nibble for
/// k < 2) and its high two from bits 2k of qh[32 half + l].
fn q6_k_codes(b: &[u8]) -> ([u8; QK_K], [f32; 16]) {
    let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], h(b, 208));
    let u = std::array::from_fn(|e| {
        let (half, k, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = ql[64 * half + l + 32 * (k % 2)] >> (4 * (k / 2)) & 0xF;
        low | (((qh[32 * half + l] >> (2 * k)) & 3) << 4)
    });
    (u, std::array::from_fn(|i| d * f32::from(sc[i] as i8)))
}

/// A Q5_0 or Q5_1 block's 32 codes: element j's low four bits in the low nibble of qs[j]
/// (j < 16) or the high nibble of qs[j - 16], its fifth bit bit j of the little-endian qh.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    std::array::from_fn(|j| {
        let low = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
        low | (((qh >> j) & 1) as u8) << 4
    })
}

/// A ggml block's 16 bytes of 4-bit codes (element j in the low nibble of byte j, element
/// j + 16 in its high nibble) in NF4's packing (element 2i high, 2i + 1 low, in byte i).
fn pack_nibbles(qs: &[u8], packed: &mut Vec<u8>) {
    let code = |e: usize| if e < 16 { qs[e] & 0xF } else { qs[e - 16] >> 4 };
    packed.extend((0..16).map(|i| (code(2 * i) << 4) | code(2 * i + 1)));
}

/// Quantizes `values` to `ty` bit for bit as ggml's reference quantizers and gguf-py's (what
/// llama.cpp's converters write with) do. Q8_0: d = max|x| / 127 stored as f16,
/// q = round(x · (1/d)) with halves away from zero. Q4_0: d = m / -8 where m is the first value
/// of largest magnitude, with its sign, q = min(15, trunc(x · (1/d) + 8.5)).
/// Types without a writer here are an error naming them.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    let n = values.len();
    let need = ty.bytes_for(n).ok_or_else(|| format!("{n} elements is not a whole number of {} blocks", ty.name()))?;
    let mut out = Vec::with_capacity(need);
    match ty {
        GgmlType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
        GgmlType::Bf16 => out.extend(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in values.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for block in values.chunks_exact(32) {
                // The first value of largest magnitude, as argmax finds it.
                let m = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = m / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        GgmlType::Q4K => {
            for block in values.chunks_exact(QK_K) {
                out.extend(q4_k_block(block));
            }
        }
        other => {
            return Err(format!(
                "writing {} tensors is not supported (F32, F16, BF16, Q8_0, Q4_0 and Q4_K are)",
                other.name()
            ));
        }
    }
    debug_assert_eq!(out.len(), need);
    Ok(out)
}

/// ggml's `nearest_int`: round half to even through the float adder (|f| <= 4194303).
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: a scale and a min (returned negated) for `x` on levels 0..=nmax,
/// searched over `nstep` + 1 candidate scales by weighted squared error; `l` gets the levels.
fn make_qkx2_quants(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One Q4_K super-block, as ggml's `quantize_row_q4_K_ref` writes it (no importance matrix):
/// per 32 values a scale and a min from [`make_qkx2_quants`], both quantized to 6 bits against
/// the block's largest, then the 4-bit levels recomputed from the stored scales.
fn q4_k_block(x: &[f32]) -> [u8; 144] {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in sub {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, &v) in w.iter_mut().zip(sub) {
            *wi = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(sub, &w, 15, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut out = [0u8; 144];
    let sc = &mut out[4..16];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &out[4..16]);
        let dj = d.to_f32() * f32::from(s);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    for (c, chunk) in l.chunks_exact(64).enumerate() {
        for i in 0..32 {
            out[16 + 32 * c + i] = chunk[i] | (chunk[i + 32] << 4);
        }
    }
    out
}

/// ggml's numeric id of a type (the inverse of [`GgmlType::from_id`]).
pub fn type_id(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 6,
        GgmlType::Q5_1 => 7,
        GgmlType::Q8_0 => 8,
        GgmlType::Q4K => 12,
        GgmlType::Q5K => 13,
        GgmlType::Q6K => 14,
        GgmlType::Bf16 => 30,
    }
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `data`. Errors when the byte length does not match.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    check_blocks(ty, data, n)?;
    let (values, bytes) = ty.block();
    let run = crate::prim::units_a_run(n / values, n);
    let mut out = vec![0f32; n];
    // Runs of whole blocks on the CPU's cores (one run when the tensor is small), each written
    // into its own part of the output.
    let jobs = data.chunks(run * bytes).zip(out.chunks_mut(run * values)).collect();
    crate::prim::run_parallel(jobs, |(d, o): (&[u8], &mut [f32])| dequantize_run(ty, d, o));
    Ok(out)
}

/// [`dequantize`] into `out`, as many values as it holds, on this thread (for a few blocks).
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    check_blocks(ty, data, out.len())?;
    dequantize_run(ty, data, out);
    Ok(())
}

/// Writes the values of `data`, whole blocks of `ty`, into `out`, which holds exactly as many.
fn dequantize_run(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    fn each<const B: usize, const V: usize>(data: &[u8], out: &mut [f32], block: impl Fn(&[u8], &mut [f32])) {
        data.chunks_exact(B).zip(out.chunks_exact_mut(V)).for_each(|(b, o)| block(b, o));
    }
    fn fill(o: &mut [f32], values: impl Iterator<Item = f32>) {
        o.iter_mut().zip(values).for_each(|(o, v)| *o = v);
    }
    match ty {
        GgmlType::F32 => each::<4, 1>(data, out, |c, o| o[0] = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        // Halves in place (aligned, and the machine's order the file's) convert a vector at a time.
        GgmlType::F16 => match bytemuck::try_cast_slice::<u8, f16>(data) {
            Ok(halves) if cfg!(target_endian = "little") => halves.convert_to_f32_slice(out),
            _ => each::<2, 1>(data, out, |c, o| o[0] = f16::from_le_bytes([c[0], c[1]]).to_f32()),
        },
        GgmlType::Bf16 => match bytemuck::try_cast_slice::<u8, bf16>(data) {
            Ok(halves) if cfg!(target_endian = "little") => halves.convert_to_f32_slice(out),
            _ => each::<2, 1>(data, out, |c, o| o[0] = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        },
        GgmlType::Q8_0 => each::<34, 32>(data, out, |b, o| {
            let d = h(b, 0);
            fill(o, b[2..34].iter().map(|&q| d * f32::from(q as i8)));
        }),
        GgmlType::Q4_0 => each::<18, 32>(data, out, |b, o| {
            let d = h(b, 0);
            let qs = &b[2..18];
            let low = qs.iter().map(|&q| d * (f32::from(q & 0xF) - 8.0));
            fill(o, low.chain(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0))));
        }),
        GgmlType::Q4_1 => each::<20, 32>(data, out, |b, o| {
            let (d, m) = (h(b, 0), h(b, 2));
            let qs = &b[4..20];
            let low = qs.iter().map(|&q| d * f32::from(q & 0xF) + m);
            fill(o, low.chain(qs.iter().map(|&q| d * f32::from(q >> 4) + m)));
        }),
        // ggml's dequantize_row_q5_0 / q5_1: d * (q - 16), or d * q + m.
        GgmlType::Q5_0 => each::<22, 32>(data, out, |b, o| {
            let d = h(b, 0);
            fill(o, q5_codes(&b[2..6], &b[6..22]).iter().map(|&q| (i32::from(q) - 16) as f32 * d));
        }),
        GgmlType::Q5_1 => each::<24, 32>(data, out, |b, o| {
            let (d, m) = (h(b, 0), h(b, 2));
            fill(o, q5_codes(&b[4..8], &b[8..24]).iter().map(|&q| f32::from(q) * d + m));
        }),
        // ggml's dequantize_row_q5_K: d1 * q - m1 per sub-block.
        GgmlType::Q5K => each::<176, 256>(data, out, |b, o| {
            for ((d1, m1, u), o) in q5_k_sub_blocks(b).into_iter().zip(o.chunks_exact_mut(32)) {
                fill(o, u.iter().map(|&q| d1 * f32::from(q) - m1));
            }
        }),
        GgmlType::Q4K => each::<144, 256>(data, out, |b, o| {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            for (j, (q, o)) in b[16..144].chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * j, scales);
                let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
                let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
                let low = q.iter().map(|&v| d1 * f32::from(v & 0xF) - m1);
                fill(o, low.chain(q.iter().map(|&v| d2 * f32::from(v >> 4) - m2)));
            }
        }),
        // ggml's dequantize_row_q6_K: d * sc * (q - 32) per sub-block of 16.
        GgmlType::Q6K => each::<210, 256>(data, out, |b, o| {
            let (u, scales) = q6_k_codes(b);
            for ((chunk, s), o) in u.chunks_exact(16).zip(scales).zip(o.chunks_exact_mut(16)) {
                fill(o, chunk.iter().map(|&q| s * (i32::from(q) - 32) as f32));
            }
        }),
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor large enough to be dequantized in runs on several cores gives, in every type,
    /// the values of its blocks dequantized one at a time (which the gguf-py fixtures of
    /// `tests/quant_fixtures.rs` hold), bit for bit, in their places; f16 and bf16 converted a
    /// vector at a time where they lie aligned, one at a time where they do not (random bits:
    /// NaNs, infinities and subnormals among them).
    #[test]
    fn a_tensor_dequantized_in_runs_is_its_blocks_one_at_a_time() {
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Bf16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ];
        for ty in types {
            let (values, bytes) = ty.block();
            // Past the size dequantized on one thread, and no whole number of runs.
            let blocks = (1 << 20) / values + 7;
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ values as u64;
            let data: Vec<u8> = (0..blocks * bytes)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 56) as u8
                })
                .collect();
            let all = dequantize(ty, &data, blocks * values).expect("whole blocks");
            assert_eq!(all.len(), blocks * values, "{}: values", ty.name());
            // Each block alone from an odd address: halves that cannot be viewed in place.
            let mut odd = vec![0u8; bytes + 1];
            for (i, block) in data.chunks(bytes).enumerate() {
                odd[1..].copy_from_slice(block);
                let one = dequantize(ty, &odd[1..], values).expect("one block");
                let got = &all[i * values..(i + 1) * values];
                if one.iter().zip(got).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    panic!("{}: block {i} of {blocks} differs from the block alone", ty.name());
                }
            }
        }
    }

    #[test]
    fn q4_1_low_nibbles_are_the_first_half() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // element 0 = 0xA, element 16 = 0x3
        let v = dequantize(GgmlType::Q4_1, &b, 32).expect("valid block");
        assert_eq!(v[0], 0.5 * 10.0 - 1.0);
        assert_eq!(v[16], 0.5 * 3.0 - 1.0);
        assert_eq!(v[1], -1.0);
    }

    /// The values the GPU computes from a repacked Q4_K block, q · d1 + (-m1) in NF4's
    /// packing, are ggml's dequantization bit for bit, for every scale and minimum code.
    #[test]
    fn q4_k_repacked_is_dequantize_bit_for_bit() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut data = Vec::new();
        for _ in 0..8 {
            let mut b = [0u8; 144];
            b.iter_mut().for_each(|x| *x = next() as u8);
            // Finite f16 d and dmin (exponent below 31), of either sign.
            for at in [1, 3] {
                b[at] &= 0xBB;
            }
            data.extend_from_slice(&b);
        }
        let n = 8 * QK_K;
        let want = dequantize(GgmlType::Q4K, &data, n).expect("valid blocks");
        let (packed, coeffs) = q4_k_repacked(&data, n).expect("valid blocks");
        assert_eq!((packed.len(), coeffs.len()), (n / 2, n / 16));
        for (e, w) in want.iter().enumerate() {
            let q = if e.is_multiple_of(2) { packed[e / 2] >> 4 } else { packed[e / 2] & 0xF };
            let (d, m) = (coeffs[2 * (e / 32)], coeffs[2 * (e / 32) + 1]);
            let got = f32::from(q) * d + m;
            assert_eq!(got.to_bits(), w.to_bits(), "element {e}: {got} vs {w}");
        }
        assert!(q4_k_repacked(&data[..143], QK_K).is_err());
    }

    /// Random blocks of `ty` (`count` of them) whose f16 scales are finite, positive or negative:
    /// bytes `f16_at` of each block are f16 values drawn from [-2^-7, 2^-7) · 2^k.
    fn random_blocks(ty: GgmlType, count: usize, seed: u64) -> Vec<u8> {
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (_, size) = ty.block();
        let f16_at: &[usize] = match ty {
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0 => &[0],
            GgmlType::Q5_1 | GgmlType::Q5K | GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
            GgmlType::Q6K => &[208],
            other => panic!("no random blocks of {}", other.name()),
        };
        let mut data = vec![0u8; count * size];
        for b in data.chunks_exact_mut(size) {
            b.iter_mut().for_each(|x| *x = next() as u8);
            for &at in f16_at {
                // Exponent 1..=16 of 31: finite, normal, of either sign.
                let v = f16::from_bits(((next() as u16) & 0x83FF) | ((1 + (next() % 16) as u16) << 10));
                b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        data
    }

    /// hi + lo of [`planes_repacked`] against ggml's dequantization: exactly for the types
    /// whose minimum is a multiple of the scale (Q8_0, Q5_0, Q6_K), and within the one rounding
    /// of 16 · s + m for the affine ones: half an ulp of |16 s + m| <= 2^-24 (16 |s| + |m|),
    /// plus the sum's own half ulp of |value| (the two roundings of the sum in f32).
    /// A tensor large enough to be repacked in runs on several cores gives, for every kept
    /// type, the codes and coefficients of its blocks repacked one at a time, in their places.
    #[test]
    fn a_tensor_repacked_in_runs_is_its_blocks_one_at_a_time() {
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::Q8_0,
        ];
        let repacked = |ty: GgmlType, data: &[u8], n: usize| -> Vec<Packed> {
            match ty {
                GgmlType::Q4_0 => vec![q4_0_repacked(data, n).expect("whole blocks")],
                GgmlType::Q4_1 => vec![q4_1_repacked(data, n).expect("whole blocks")],
                GgmlType::Q4K => vec![q4_k_repacked(data, n).expect("whole blocks")],
                _ => {
                    let p = planes_repacked(ty, data, n).expect("whole blocks");
                    vec![p.hi, p.lo]
                }
            }
        };
        for ty in types {
            let (values, bytes) = ty.block();
            // Past the size repacked on one thread, and no whole number of runs.
            let blocks = (1 << 20) / values + 5;
            let data = random_blocks(ty, blocks, 0xB10C + values as u64);
            let all = repacked(ty, &data, blocks * values);
            for (p, (codes, coeffs)) in all.iter().enumerate() {
                assert_eq!(codes.len(), blocks * values / 2, "{} plane {p}: codes", ty.name());
                let per_block = coeffs.len() / blocks;
                assert_eq!(coeffs.len(), per_block * blocks, "{} plane {p}: coefficients", ty.name());
                for (i, block) in data.chunks(bytes).enumerate() {
                    let (one_codes, one_coeffs) = &repacked(ty, block, values)[p];
                    let same_coeffs = one_coeffs
                        .iter()
                        .zip(&coeffs[i * per_block..(i + 1) * per_block])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    if one_codes[..] != codes[i * values / 2..(i + 1) * values / 2] || !same_coeffs {
                        panic!("{} plane {p}: block {i} of {blocks} differs from the block alone", ty.name());
                    }
                }
            }
        }
    }

    #[test]
    fn planes_add_up_to_the_dequantized_values() {
        for (ty, exact) in [
            (GgmlType::Q8_0, true),
            (GgmlType::Q5_0, true),
            (GgmlType::Q6K, true),
            (GgmlType::Q5_1, false),
            (GgmlType::Q5K, false),
        ] {
            let (per_block, _) = ty.block();
            let n = 6 * per_block.max(64);
            let data = random_blocks(ty, n / per_block, 0x5EED + n as u64);
            let want = dequantize(ty, &data, n).expect("valid blocks");
            let p = planes_repacked(ty, &data, n).expect("valid blocks");
            let block = planes_block(ty).expect("a planes type");
            assert_eq!(p.block, block);
            assert_eq!(
                (p.hi.0.len(), p.hi.1.len(), p.lo.0.len(), p.lo.1.len()),
                (n / 2, n / block * 2, n / 2, n / block * 2)
            );
            assert_eq!(Planes::gpu_bytes(block, n), p.hi.0.len() * 2 + p.hi.1.len() * 8, "{}", ty.name());
            let value = |(packed, coeffs): &(Vec<u8>, Vec<f32>), e: usize| {
                let q = if e.is_multiple_of(2) { packed[e / 2] >> 4 } else { packed[e / 2] & 0xF };
                let (s, m) = (coeffs[2 * (e / block)], coeffs[2 * (e / block) + 1]);
                (f32::from(q) * s + m, 16.0 * s.abs() + m.abs())
            };
            let mut rounded = 0;
            for (e, &w) in want.iter().enumerate() {
                let ((hi, bound), (lo, _)) = (value(&p.hi, e), value(&p.lo, e));
                let got = hi + lo;
                if exact {
                    // Equal as numbers: ggml's d · 0 may be -0 where the planes add to +0.
                    assert!(got == w, "{} element {e}: {hi} + {lo} vs {w}", ty.name());
                } else {
                    let tol = 2f32.powi(-24) * (bound + w.abs());
                    assert!((got - w).abs() <= tol, "{} element {e}: {got} vs {w} (tolerance {tol})", ty.name());
                    rounded += usize::from(got != w);
                }
            }
            eprintln!("{}: {n} values, {rounded} a rounding away from ggml's", ty.name());
            assert!(planes_repacked(ty, &data[1..], n).is_err(), "{}: short data", ty.name());
        }
        assert!(planes_repacked(GgmlType::Q4_0, &[0u8; 18], 32).is_err(), "Q4_0 has its own kernels");
    }

    #[test]
    fn wrong_length_is_an_error_not_a_panic() {
        let err = dequantize(GgmlType::Q4_0, &[0u8; 17], 32).expect_err("short block");
        assert!(err.contains("17 bytes"), "{err}");
        assert!(dequantize(GgmlType::Q4K, &[0u8; 144], 100).is_err());
    }
}
