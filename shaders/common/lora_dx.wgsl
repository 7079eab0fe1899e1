// The operands of a LoRA adapter's dh A that the many-row input-gradient kernels
// (common/matmul_dx.wgsl, common/simd8_dx.wgsl) fuse in, bound after y: dh (row m's values at
// m * lora_h_stride + lora_h) and the adapter's buffer holding the A matrices, whose rows are
// gathered from up to three blocks of lora_seg_rows rows (from elements lora_b, lora_w1 and
// lora_w2). The including shader declares LORA_H_BINDING and LORA_B_BINDING.

@group(0) @binding(LORA_H_BINDING) var<storage, read> lora_h: array<f32>;      // dh, or a dummy
@group(0) @binding(LORA_B_BINDING) var<storage, read> lora_b: array<f32>;      // the A matrices, or a dummy

#include "common/gathered_row.wgsl"

// Where row i of the gathered A starts in lora_b.
fn lora_a_row(i: u32) -> u32 {
    return gathered_row(i, p.lora_seg_rows, vec3<u32>(p.lora_b, p.lora_w1, p.lora_w2));
}
