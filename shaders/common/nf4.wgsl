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

// Element (n, k) of an (N, K) NF4 weight, dequantized, for the shaders that declare `p`
// (MatmulParams), the packed words `w` and their `absmax` scales.
fn w_at(n: u32, k: u32) -> f32 {
    let flat = n * p.k + k;
    return nf4_value(w[flat / 8u], flat % 8u) * absmax[flat / p.block_size];
}
