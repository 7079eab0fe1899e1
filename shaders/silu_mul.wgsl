// SwiGLU gate: out = silu(gate) * up (common/gates.wgsl).
#include "common/gates.wgsl"
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> gate: array<f32>;         // (N)
@group(0) @binding(2) var<storage, read> up: array<f32>;           // (N)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (N)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= p.n) { return; }
    out[i] = silu(gate[i]) * up[i];
}
