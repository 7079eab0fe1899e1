// Element access to an NF4 weight; the code book and unpacking rule are in common/nf4_code.wgsl.
#include "common/nf4_code.wgsl"
#include "common/nf4_block.wgsl"

// Element (n, k) of an (N, K) NF4 weight, dequantized, for the shaders that declare `p`
// (MatmulParams), the packed words `w` and their `absmax` scales.
fn w_at(n: u32, k: u32) -> f32 {
    let flat = n * p.k + k;
    let c = block_coeffs(flat / BLOCK_SIZE);
    return nf4_value(w[flat / 8u], flat % 8u) * c.x + c.y;
}

// Elements e0..e0+3 of a packed word (e0 = 0 or 4), as code values through the code snippet's
// nf4_code_select (NF4's, or a GGUF format's that a variant swaps in).
fn nf4_vec4(word: u32, e0: u32) -> vec4<f32> {
    let b = word >> (4u * e0);   // bytes e0/2 and e0/2 + 1 hold elements e0, e0+1 and e0+2, e0+3
    return vec4<f32>(
        nf4_code_select((b >> 4u) & 0xFu),
        nf4_code_select(b & 0xFu),
        nf4_code_select((b >> 12u) & 0xFu),
        nf4_code_select((b >> 8u) & 0xFu),
    );
}
