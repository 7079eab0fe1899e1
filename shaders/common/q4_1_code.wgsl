// GGUF's Q4_1 as the NF4 kernels read it: the codes q (0..15) in NF4's packing (byte i holds
// element 2i in its HIGH nibble and 2i+1 in its low nibble, repacked on load from ggml's
// order), and for each block of 32 its f16 scale d and minimum m, exactly, as two f32 in the
// shader's `absmax` (d at 2b, m at 2b + 1, read by common/q4_1_block.wgsl): value = q * d + m.
// A variant of every NF4 kernel swaps common/nf4_code.wgsl for this file and nf4_block.wgsl
// for q4_1_block.wgsl, so the names stay NF4's.
var<private> NF4_CODE: array<f32, 16> = array<f32, 16>(
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
);

// Element e (0..8) of a packed word, as its code (before the block's scale and minimum).
fn nf4_value(word: u32, e: u32) -> f32 {
    let shift = 8u * (e / 2u) + select(0u, 4u, e % 2u == 0u);
    return f32((word >> shift) & 0xFu);
}

// The code of a 4-bit index (the register-tiled kernels' entry point).
fn nf4_code_select(q: u32) -> f32 {
    return f32(q);
}
