// Shared by matmul.wgsl and matmul_nf4.wgsl: the params struct and the reduction epilogue. The
// including shader declares `p`, `bias` and `y`.
//
// Work split: a workgroup computes an (TM rows m) x (NB columns n) block of y. Its 64 threads
// stride over K together, so neighbouring threads read neighbouring weights (coalesced on GPUs,
// vector loads on CPU rasterizers), each keeping TM*NB partial sums; a tree reduction in
// workgroup memory adds the 64 partials.
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
const NB: u32 = 8u;
const WG: u32 = 64u;
var<workgroup> red: array<f32, 2048>;                              // (TM * NB, WG)

// Adds the partial sums of all threads and writes the block (plus bias).
fn reduce_and_store(acc: array<f32, 32>, lid: u32, m0: u32, n0: u32) {
    for (var i = 0u; i < TM * NB; i++) { red[i * WG + lid] = acc[i]; }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i < TM * NB; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
        }
        workgroupBarrier();
    }
    if (lid < TM * NB) {
        let c = lid / TM;
        let r = lid % TM;
        let n = n0 + c;
        let m = m0 + r;
        if (n < p.n && m < p.m) {
            var b = 0.0;
            if (p.has_bias != 0u) { b = bias[n]; }
            y[m * p.y_stride + p.y_col_offset + n] = red[lid * WG] + b;
        }
    }
}
