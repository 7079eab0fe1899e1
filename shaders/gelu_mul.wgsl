// GeGLU gate with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`):
//   out = gelu(gate) * up,  gelu(g) = g / 2 * (1 + tanh(c * (g + 0.044715 g^3))),  c = sqrt(2 / pi).
// tanh's argument is clamped to [-15, 15], where tanh is already +-1 in f32, so that no
// implementation's tanh overflows for large gates.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> gate: array<f32>;         // (N)
@group(0) @binding(2) var<storage, read> up: array<f32>;           // (N)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (N)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    let g = gate[i];
    let th = tanh(clamp(0.7978845608028654 * (g + 0.044715 * g * g * g), -15.0, 15.0));
    out[i] = 0.5 * g * (1.0 + th) * up[i];
}
