// Element access to an NF4 weight; the code book and unpacking rule are in common/nf4_code.wgsl.
#include "common/nf4_code.wgsl"
#include "common/nf4_block.wgsl"

// Element (n, k) of an (N, K) NF4 weight, dequantized, for the shaders that declare `p`
// (MatmulParams), the packed words `w` and their `absmax` scales.
fn w_at(n: u32, k: u32) -> f32 {
    let flat = n * p.k + k;
    let c = block_coeffs(flat / p.block_size);
    return nf4_value(w[flat / 8u], flat % 8u) * c.x + c.y;
}
