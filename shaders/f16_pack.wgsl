// Half-precision storage of a saved activation (f16 activations, mixed precision): packs n f32
// values into ceil(n / 2) u32 words of two f16 each, low half first, and writes the rounded
// values back into x, so that the rest of the forward pass computes with exactly the values
// the backward pass will read. The conversion is WGSL's core pack2x16float, so this needs no
// optional feature. pack2x16float leaves values outside f16's range undefined, so they are
// handled first, as a cast to f16 does: NaN stays NaN, and a magnitude of 65520 or more
// (which rounds past 65504, the largest f16) becomes an infinity of its sign.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;        // (N), rounded in place
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;   // (ceil(N / 2))

const F16_MAX: f32 = 65504.0;
const F16_OVERFLOW: u32 = 0x477ff000u;   // 65520.0: the first magnitude that rounds to infinity

// The 16 bits of v as f16.
fn half_bits(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    let magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return 0x7e00u;                                   // NaN
    }
    if (magnitude >= F16_OVERFLOW) {
        return ((bits >> 16u) & 0x8000u) | 0x7c00u;       // infinity of v's sign
    }
    return pack2x16float(vec2<f32>(clamp(v, -F16_MAX, F16_MAX), 0.0)) & 0xffffu;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;   // one word: elements 2i and 2i + 1
    let j = 2u * i;
    if (j >= p.n) { return; }
    let has_high = j + 1u < p.n;
    var word = half_bits(x[j]);
    if (has_high) {
        word = word | (half_bits(x[j + 1u]) << 16u);
    }
    packed[i] = word;
    let rounded = unpack2x16float(word);
    x[j] = rounded.x;
    if (has_high) {
        x[j + 1u] = rounded.y;
    }
}
