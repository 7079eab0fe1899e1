// Global L2 norm of a flat gradient buffer, in two dispatches of this shader with a fixed
// partition, so the result is the same on every run:
//   pass 1 (final_pass = 0): out[g] = sum of x[i]^2 over the elements of workgroup g
//                             (i = g*256 + lid + j * n_groups*256);
//   pass 2 (final_pass = 1): one workgroup, out[0] = sqrt(sum of x[0..n)).
struct GradNormParams {
    n: u32,
    final_pass: u32,
    n_groups: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: GradNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (n)
@group(0) @binding(2) var<storage, read_write> out: array<f32>;    // (n_groups) or (1)

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    if (p.final_pass == 0u) {
        for (var i = wg.x * 256u + lid; i < p.n; i += p.n_groups * 256u) { s += x[i] * x[i]; }
    } else {
        for (var i = lid; i < p.n; i += 256u) { s += x[i]; }
    }
    part[lid] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { part[lid] += part[lid + stride]; }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (p.final_pass == 0u) { out[wg.x] = part[0]; } else { out[0] = sqrt(part[0]); }
    }
}
