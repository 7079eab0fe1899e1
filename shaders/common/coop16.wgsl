// The `coop16` matmul core: the forward product of common/matmul.wgsl,
//   out[r, c] = sum_j A(r, j) * B(c, j),
// on the GPU's matrix units through cooperative matrices (wgpu's
// EXPERIMENTAL_COOPERATIVE_MATRIX): 16 x 16 x 16 fragments with f16 operands and f32
// accumulators. It stands in for common/tile128.wgsl in the tile128 forward and input-gradient
// kernels (variants in shaders/src/lib.rs). The matrix operations are in common/coop_mma.wgsl (its
// `enable` lines move to the top of the module when it is expanded); the variants that swap in
// common/coop_mma_emulated.wgsl run everything else here on adapters without matrix units.
//
//   - A workgroup of 256 threads, 8 subgroups of 32, computes a 128 x 128 output block; subgroup
//     s owns rows 32 (s / 2) .. + 32 and columns 64 (s % 2) .. + 64: 2 x 4 accumulator fragments.
//   - Operands are fetched as in common/tile128.wgsl (common/tile_fetch.wgsl: 8 values a thread
//     a step of 16, prefetched into registers while the step before is multiplied), rounded to
//     f16 and staged transposed, (16, 136) halves: A column-major (element (r, j) at j * 136 + r)
//     and B row-major as a (K, N) matrix (element (j, c) at j * 136 + c), so that a fragment is
//     one coopLoad / coopLoadT with stride 136.
//   - The epilogue stores each fragment to a 16 x 16 f32 scratch of its subgroup and writes it
//     out through common/matmul_store.wgsl (split reduction, alpha, bias, accumulation).
//
//   - Before its reduction a workgroup scans its 128 rows of A over its slice of the reduction
//     and scales each row by a power of two that brings the row's largest magnitude into
//     [2^14, 2^15); the epilogue divides it out again. Both are exact, so an A of any range
//     (activations past f16's largest value, 65504, or input gradients far below its smallest
//     normal one, 6.1e-5) keeps f16's 11 significant bits. B (weights) is rounded unscaled.
//
// Rounding the operands to f16 (unit roundoff u = 2^-11) moves each product by at most 2u of
// its size, so an output moves by at most about 2u sum_j |A(r, j) B(c, j)|, plus what f16's
// subnormals lose on the smallest operands (at most 2^-25 each, of B, or of A scaled): the bound
// the start-up self-test (gpu/probe.rs) checks against exact sums, forward and for the input
// gradient through NF4, before the family is used. Weight gradients (dA, dB: reductions over
// tokens of two gradients-sized operands) stay in f32 (tile128).
//
// Subgroups are assumed to be 32 lanes; the self-test is what makes sure, and a failure leaves
// the family unused.

const BR: u32 = 128u;
const BC: u32 = 128u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;
const HS: u32 = 136u;                                              // halves per staged row
var<workgroup> a_half: array<f16, 2176>;                           // (BK, HS)
var<workgroup> b_half: array<f16, 2176>;
var<workgroup> frag_out: array<f32, 2048>;                         // a 16 x 16 fragment per subgroup
var<workgroup> row_exp: array<i32, 128>;                           // each row of A is scaled by 2^row_exp

#include "common/tile_fetch.wgsl"
#include "common/matmul_store.wgsl"
#include "common/coop_mma.wgsl"

// Stores a chunk, rounded to f16, into a staged tile (a_half when `is_a`, each value times its
// row's scale).
fn put_half(is_a: bool, along: bool, lid: u32, c: Chunk) {
    var v = array<f32, 8>(c.lo.x, c.lo.y, c.lo.z, c.lo.w, c.hi.x, c.hi.y, c.hi.z, c.hi.w);
    var at: vec2<u32>;
    if (along) { at = along_rows(lid); } else { at = along_j(lid); }
    for (var e = 0u; e < 8u; e++) {
        var i: u32;
        var row: u32;
        if (along) { i = at.y * HS + at.x + e; row = at.x + e; } else { i = (at.y + e) * HS + at.x; row = at.x; }
        if (is_a) { a_half[i] = f16(ldexp(v[e], row_exp[row])); } else { b_half[i] = f16(v[e]); }
    }
}

// The exponent of the power of two that brings a row whose largest magnitude is `top` into
// [2^14, 2^15): 0 for a row of zeros, or one with an infinity or NaN (whose outputs are then
// infinite or NaN whatever the scale). Kept within +-126 so that both 2^e and 2^-e are normal.
fn scale_exp(top: f32) -> i32 {
    if (!(top > 0.0) || !(top <= 3.4028235e38)) { return 0; }
    return clamp(15 - frexp(top).exp, -126, 126);
}

// Fills row_exp for rows r0.. of A over reductions j_begin..j_end: 16 threads a row read 16
// consecutive j at a time, 16 rows a sweep, 8 sweeps; frag_out (used only by the epilogue)
// holds the threads' maxima until one thread a row reduces them.
fn scale_rows(r0: u32, j_begin: u32, j_end: u32, lid: u32) {
    let sub = lid % 16u;
    for (var sweep = 0u; sweep < 8u; sweep++) {
        let row = r0 + sweep * 16u + lid / 16u;
        var top = 0.0;
        for (var j = j_begin + sub; j < j_end; j += 16u) {
            top = max(top, abs(load_a(row, j)));
        }
        frag_out[sweep * 256u + lid] = top;
    }
    workgroupBarrier();
    if (lid < 128u) {
        var top = 0.0;
        for (var t = 0u; t < 16u; t++) {
            top = max(top, frag_out[(lid / 16u) * 256u + (lid % 16u) * 16u + t]);
        }
        row_exp[lid] = scale_exp(top);
    }
    workgroupBarrier();
}

// Writes one accumulator fragment, rows row0.. (row block_row.. of the block) and columns
// col0.. of the output, through the subgroup's scratch, with the rows' scales divided out: lane
// l writes row l / 2, columns 8 (l % 2) .. + 8.
fn write_fragment(f: AccFrag, s: u32, lane: u32, block_row: u32, row0: u32, col0: u32, n_rows: u32, n_cols: u32) {
    store_frag(f, s * 256u);
    workgroupBarrier();
    let i = s * 256u + (lane / 2u) * 16u + (lane % 2u) * 8u;
    let row = row0 + lane / 2u;
    let col = col0 + (lane % 2u) * 8u;
    let unscale = vec4<i32>(-row_exp[block_row + lane / 2u]);
    let lo = vec4<f32>(frag_out[i], frag_out[i + 1u], frag_out[i + 2u], frag_out[i + 3u]);
    let hi = vec4<f32>(frag_out[i + 4u], frag_out[i + 5u], frag_out[i + 6u], frag_out[i + 7u]);
    store4(row, col, ldexp(lo, unscale), n_rows, n_cols);
    store4(row, col + 4u, ldexp(hi, unscale), n_rows, n_cols);
    workgroupBarrier();
}

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    stage_code_table(lid);
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let s = lid / 32u;
    let lane = lid % 32u;
    let sr = (s / 2u) * 32u;
    let sc = (s % 2u) * 64u;
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    scale_rows(r0, j_begin, j_end, lid);
    mma_lane(lane);
    var c00 = AccFrag();
    var c01 = AccFrag();
    var c02 = AccFrag();
    var c03 = AccFrag();
    var c10 = AccFrag();
    var c11 = AccFrag();
    var c12 = AccFrag();
    var c13 = AccFrag();
    var next_a = fetch_generic_a(r0, j_begin, lid);
    var next_b = fetch_b(c0, j_begin, lid);
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        put_half(true, A_ALONG_ROWS, lid, next_a);
        put_half(false, B_ALONG_ROWS, lid, next_b);
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next_a = fetch_generic_a(r0, j0 + BK, lid);
            next_b = fetch_b(c0, j0 + BK, lid);
        }
        let a0 = load_a_frag(sr);
        let a1 = load_a_frag(sr + 16u);
        let b0 = load_b_frag(sc);
        let b1 = load_b_frag(sc + 16u);
        let b2 = load_b_frag(sc + 32u);
        let b3 = load_b_frag(sc + 48u);
        c00 = mma(a0, b0, c00);
        c01 = mma(a0, b1, c01);
        c02 = mma(a0, b2, c02);
        c03 = mma(a0, b3, c03);
        c10 = mma(a1, b0, c10);
        c11 = mma(a1, b1, c11);
        c12 = mma(a1, b2, c12);
        c13 = mma(a1, b3, c13);
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output.
    let zr = wg.z * n_rows;
    let rows = zr + r0 + sr;
    let cols = c0 + sc;
    let end = zr + n_rows;
    write_fragment(c00, s, lane, sr, rows, cols, end, n_cols);
    write_fragment(c01, s, lane, sr, rows, cols + 16u, end, n_cols);
    write_fragment(c02, s, lane, sr, rows, cols + 32u, end, n_cols);
    write_fragment(c03, s, lane, sr, rows, cols + 48u, end, n_cols);
    write_fragment(c10, s, lane, sr + 16u, rows + 16u, cols, end, n_cols);
    write_fragment(c11, s, lane, sr + 16u, rows + 16u, cols + 16u, end, n_cols);
    write_fragment(c12, s, lane, sr + 16u, rows + 16u, cols + 32u, end, n_cols);
    write_fragment(c13, s, lane, sr + 16u, rows + 16u, cols + 48u, end, n_cols);
}
