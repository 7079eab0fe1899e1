// The second half of a split reduction (common/matmul.wgsl): y[row, col] = epilogue(sum over z
// of partial[z, row, col]). p is the matmul's own MatmulParams with m = output rows,
// n = output columns and k = the number of slices; the epilogue (alpha, bias, accumulation,
// stride and column offset) is the matmul's.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> partial: array<f32>;      // (k, m, n)
@group(0) @binding(2) var<storage, read> bias: array<f32>;         // (n) or a dummy when has_bias = 0
@group(0) @binding(3) var<storage, read_write> y: array<f32>;      // (m, y_stride)

#include "common/matmul_store.wgsl"

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;                          // one thread per 4 columns
    let quads = (p.n + 3u) / 4u;
    let row = i / quads;
    let col = (i % quads) * 4u;
    if (row >= p.m) { return; }
    var v = vec4<f32>(0.0);
    for (var z = 0u; z < p.k; z++) {
        let base = (z * p.m + row) * p.n + col;
        for (var j = 0u; j < 4u; j++) {
            if (col + j < p.n) { v[j] += partial[base + j]; }
        }
    }
    store4(row, col, v, p.m, p.n);
}
