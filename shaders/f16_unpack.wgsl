// Reads back an activation stored by f16_pack.wgsl: n f32 values from ceil(n / 2) words of two
// f16 each, low half first (WGSL's core unpack2x16float, exact for every f16).
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> packed: array<u32>;         // (ceil(N / 2))
@group(0) @binding(2) var<storage, read_write> x: array<f32>;        // (N)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    let j = 2u * i;
    if (j >= p.n) { return; }
    let v = unpack2x16float(packed[i]);
    x[j] = v.x;
    if (j + 1u < p.n) {
        x[j + 1u] = v.y;
    }
}
