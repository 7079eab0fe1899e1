// GGUF's Q4_0 as the NF4 kernels read it: the same packing (byte i of the packed tensor holds
// element 2i in its HIGH nibble and 2i+1 in its low nibble; word j holds elements 8j..8j+7,
// repacked on load from ggml's order) and one f32 scale per block of 32 (ggml's f16 d, exactly),
// with the linear code book of Q4_0 in place of NF4's: value = (q - 8) * d. A variant of every
// NF4 kernel swaps common/nf4_code.wgsl for this file, so the names stay NF4's.
var<private> NF4_CODE: array<f32, 16> = array<f32, 16>(
    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
);

// Element e (0..8) of a packed word, as its code value (before the block's scale).
fn nf4_value(word: u32, e: u32) -> f32 {
    let shift = 8u * (e / 2u) + select(0u, 4u, e % 2u == 0u);
    return f32((word >> shift) & 0xFu) - 8.0;
}

// The code value of a 4-bit index (the register-tiled kernels' entry point).
fn nf4_code_select(q: u32) -> f32 {
    return f32(q) - 8.0;
}
