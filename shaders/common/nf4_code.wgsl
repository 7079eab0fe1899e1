// NF4 code book (bitsandbytes get_4bit_type("nf4")) and the unpacking rule shared by every NF4
// kernel: byte i of the packed tensor holds element 2i in its HIGH nibble and 2i+1 in its low
// nibble; four bytes make one little-endian u32 word, so word j holds elements 8j..8j+7.
var<private> NF4_CODE: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
);

// Element e (0..8) of a packed word, as its code value (before the absmax scale).
fn nf4_value(word: u32, e: u32) -> f32 {
    let shift = 8u * (e / 2u) + select(0u, 4u, e % 2u == 0u);
    return NF4_CODE[(word >> shift) & 0xFu];
}

// The code value of a 4-bit index as a tree of selects instead of a table lookup. CPU
// rasterizers turn a dynamically indexed array into a lane-by-lane gather; selects stay in SIMD
// registers. Used by the register-tiled kernels (common/simd8.wgsl).
fn nf4_code_select(q: u32) -> f32 {
    let v0 = select(-1.0, -0.6961928009986877, (q & 1u) != 0u);
    let v1 = select(-0.5250730514526367, -0.39491748809814453, (q & 1u) != 0u);
    let v2 = select(-0.28444138169288635, -0.18477343022823334, (q & 1u) != 0u);
    let v3 = select(-0.09105003625154495, 0.0, (q & 1u) != 0u);
    let v4 = select(0.07958029955625534, 0.16093020141124725, (q & 1u) != 0u);
    let v5 = select(0.24611230194568634, 0.33791524171829224, (q & 1u) != 0u);
    let v6 = select(0.44070982933044434, 0.5626170039176941, (q & 1u) != 0u);
    let v7 = select(0.7229568362236023, 1.0, (q & 1u) != 0u);
    let u0 = select(v0, v1, (q & 2u) != 0u);
    let u1 = select(v2, v3, (q & 2u) != 0u);
    let u2 = select(v4, v5, (q & 2u) != 0u);
    let u3 = select(v6, v7, (q & 2u) != 0u);
    let t0 = select(u0, u1, (q & 4u) != 0u);
    let t1 = select(u2, u3, (q & 4u) != 0u);
    return select(t0, t1, (q & 8u) != 0u);
}
