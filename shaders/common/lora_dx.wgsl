// The operands of a LoRA adapter's dh A that the many-row input-gradient kernels
// (common/matmul_dx.wgsl, common/simd8_dx.wgsl) fuse in, bound after y: dh (row m's values at
// m * lora_h_stride + lora_h) and the adapter's buffer holding the A matrices, whose rows are
// gathered from up to three blocks of lora_seg_rows rows (from elements lora_b, lora_w1 and
// lora_w2). The including shader declares LORA_H_BINDING and LORA_B_BINDING.

@group(0) @binding(LORA_H_BINDING) var<storage, read> lora_h: array<f32>;      // dh, or a dummy
@group(0) @binding(LORA_B_BINDING) var<storage, read> lora_b: array<f32>;      // the A matrices, or a dummy

// Where row i of the gathered A starts in lora_b.
fn lora_a_row(i: u32) -> u32 {
    let block = i / p.lora_seg_rows;
    var first = p.lora_b;
    if (block == 1u) { first = p.lora_w1; }
    if (block == 2u) { first = p.lora_w2; }
    return first + (i % p.lora_seg_rows) * p.k;
}
