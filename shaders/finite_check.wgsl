// Sets flag[0] to 1 when any of the n values of x is a NaN or an infinity, and leaves it as it
// was otherwise, so that one flag covers every micro-batch of a step: the step's losses. AdamW
// (adamw.wgsl) skips an update whose flag is set. One workgroup.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (n)
@group(0) @binding(2) var<storage, read_write> flag: array<u32>;   // (1)

var<workgroup> bad: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    var b = 0u;
    for (var i = lid; i < p.n; i += 256u) {
        if ((bitcast<u32>(x[i]) & 0x7f800000u) == 0x7f800000u) { b = 1u; }
    }
    bad[lid] = b;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { bad[lid] = max(bad[lid], bad[lid + stride]); }
        workgroupBarrier();
    }
    if (lid == 0u && bad[0] != 0u) { flag[0] = 1u; }
}
