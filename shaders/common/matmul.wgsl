// Shared by matmul.wgsl and matmul_nf4.wgsl: the params struct, the x-tile staging and the
// epilogue. The including shader declares `p`, `x`, `bias` and `y`.
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    y_stride: u32,
    y_col_offset: u32,
    block_size: u32,
    _pad: u32,
}

const TM: u32 = 4u;
var<workgroup> xs: array<f32, 256>;                                // (TM, 64)

// Stages x[m0..m0+TM, k0..k0+64] into xs (zeros outside x).
fn load_x_tile(m0: u32, k0: u32, lid: u32) {
    for (var r = 0u; r < TM; r++) {
        var v = 0.0;
        if (m0 + r < p.m && k0 + lid < p.k) { v = x[(m0 + r) * p.k + k0 + lid]; }
        xs[r * 64u + lid] = v;
    }
}

// Writes TM results of column n (plus its bias).
fn store_rows(n: u32, m0: u32, acc: array<f32, 4>) {
    if (n >= p.n) { return; }
    var b = 0.0;
    if (p.has_bias != 0u) { b = bias[n]; }
    for (var r = 0u; r < TM; r++) {
        if (m0 + r < p.m) { y[(m0 + r) * p.y_stride + p.y_col_offset + n] = acc[r] + b; }
    }
}
