// Backward of the SwiGLU gate out = silu(gate) * up, with s = sigmoid(gate):
//   dup   = dout * silu(gate)
//   dgate = dout * up * s * (1 + gate * (1 - s))
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
    let s = 1.0 / (1.0 + exp(-g));
    let d = dout[i];
    dup[i] = d * g * s;
    dgate[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
}
