// Backward of the GeGLU gate out = gelu(gate) * up (tanh approximation, gelu_mul.wgsl), with
// u = c * (g + 0.044715 g^3) and t = tanh(u):
//   dup   = dout * gelu(gate)
//   dgate = dout * up * (0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 g^2))
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> gate: array<f32>;         // (N)
@group(0) @binding(2) var<storage, read> up: array<f32>;           // (N)
@group(0) @binding(3) var<storage, read> dout: array<f32>;         // (N)
@group(0) @binding(4) var<storage, read_write> dgate: array<f32>;  // (N)
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;    // (N)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    let g = gate[i];
    let c = 0.7978845608028654;
    let t = tanh(clamp(c * (g + 0.044715 * g * g * g), -15.0, 15.0));
    let d = dout[i];
    dup[i] = d * 0.5 * g * (1.0 + t);
    dgate[i] = d * up[i] * (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 0.134145 * g * g));
}
