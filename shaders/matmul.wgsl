// Dense linear layer: y[m, y_col_offset + n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
// w is (N, K) row-major as PyTorch stores nn.Linear weights. A workgroup computes 64 columns n
// for 4 rows m, staging a 4x64 tile of x in workgroup memory so each weight is read once per 4 rows.
#include "common/matmul.wgsl"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (M, K)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (N, K)
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // (N) or a dummy when has_bias = 0
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // (M, y_stride)

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wg.x * 64u + lid;
    let m0 = wg.y * TM;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var k0 = 0u; k0 < p.k; k0 += 64u) {
        load_x_tile(m0, k0, lid);
        workgroupBarrier();
        if (n < p.n) {
            let kmax = min(64u, p.k - k0);
            let wrow = n * p.k + k0;
            for (var kk = 0u; kk < kmax; kk++) {
                let wv = w[wrow + kk];
                for (var r = 0u; r < TM; r++) { acc[r] += xs[r * 64u + kk] * wv; }
            }
        }
        workgroupBarrier();
    }
    store_rows(n, m0, acc);
}
