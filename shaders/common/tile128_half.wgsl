// The `half` matmul core: common/tile128.wgsl's product,
//   out[r, c] = sum_j A(r, j) * B(c, j),
// with f16 arithmetic where an adapter has no matrix units: its tiles, threads and prefetch,
// the operands staged as f16 and multiplied in f16 (a vec4<f16> multiply-add is two packed
// instructions for four products, where f32 takes four), each product summed in f16 over a run
// of HALF_RUN steps of the reduction and each run's sums added to f32 accumulators. It stands in
// for common/tile128.wgsl in the tile128 forward kernels and the input gradients through frozen
// weights (variants in shaders/src/lib.rs), as common/coop16.wgsl does on matrix units.
//
//   - A workgroup of 256 threads computes a 128 x 128 output block, each thread 8 x 8 of it as
//     in tile128 (rows {4ty..+4, 64+4ty..+4}, columns {4tx..+4, 64+4tx..+4}); one step of the
//     reduction reads 4 vec4<f16>s of workgroup memory for 64 multiply-adds.
//   - Operands are fetched as in tile128 (common/tile_fetch.wgsl: 8 values a thread a step of
//     16, prefetched into registers while the step before is multiplied) and staged transposed
//     as f16, (16, 132) halves each, rows padded by 4.
//   - Range: before its reduction a workgroup scans its 128 rows of A over its slice and scales
//     each row by a power of two that brings its largest magnitude into [2^2, 2^3); B is scaled
//     by 2^8; the epilogue divides both out (all exact). So an A of any range (activations past
//     f16's largest value, gradients far below its smallest normal one) keeps f16's 11
//     significant bits, a product of |B| < 2 is below 2^12 and a run of 8 below 2^15 (f16's
//     largest value is 65504), and a scaled value below f16's smallest normal one, 2^-14, is
//     2^-17 of its row's largest or a weight below 2^-22.
//   - A step in which any value of B is 2 or more in magnitude (a run could then pass 65504) is
//     summed exactly in f32 from the operands in storage instead, by the whole workgroup: each
//     thread that stages such a value raises `big_step` to the step's number.
//
// Error: rounding the operands moves a product by at most 2u of its size (u = 2^-11), and a run
// of n products summed in f16 by at most n u of the run's mass (each product rounded once, each
// of the n - 1 partial sums once), so an output moves by at most about (HALF_RUN + 2) u
// sum_j |A(r, j) B(c, j)|, plus what f16's range floor loses on the smallest values (at most
// 2^-14 a scaled operand, product or sum, flushed or not), plus the f32 sums of the runs.
// tests/kernels.rs holds each output to that bound.

enable f16;

const BR: u32 = 128u;
const BC: u32 = 128u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;
const HALF_RUN: u32 = 8u;                                          // products summed in f16
const HALF_A_TOP: i32 = 3;                                         // A's rows into [2^2, 2^3)
const HALF_B_EXP: i32 = 8;                                         // B times 2^8
const HALF_B_LIMIT: f32 = 2.0;                                     // |B| from here: exact step
const STRIDE4: u32 = (BR + 4u) / 4u;                               // vec4s per staged row
var<workgroup> a_tile: array<vec4<f16>, BK * STRIDE4>;
var<workgroup> b_tile: array<vec4<f16>, BK * STRIDE4>;
var<workgroup> row_exp: array<i32, 128>;                           // each row of A is scaled by 2^row_exp
var<workgroup> row_top: array<f32, 256>;                           // the scan's maxima, a sweep at a time
var<workgroup> big_step: atomic<u32>;                              // the last step with a |B| >= 2

#include "common/tile_fetch.wgsl"
#include "common/matmul_store.wgsl"

// The exponent of the power of two that brings a row whose largest magnitude is `top` into
// [2^2, 2^3): 0 for a row of zeros, or one with an infinity or NaN (whose outputs are then
// infinite or NaN whatever the scale). Kept within +-126 so that 2^e is a normal f32.
fn half_scale_exp(top: f32) -> i32 {
    if (!(top > 0.0) || !(top <= 3.4028235e38)) { return 0; }
    return clamp(HALF_A_TOP - frexp(top).exp, -126, 126);
}

// Fills row_exp for rows r0.. of A over reductions j_begin..j_end: 16 threads a row read 16
// consecutive j at a time, 16 rows a sweep, 8 sweeps; the first 16 threads reduce a sweep's
// maxima.
fn scale_rows(r0: u32, j_begin: u32, j_end: u32, lid: u32) {
    let sub = lid % 16u;
    for (var sweep = 0u; sweep < 8u; sweep++) {
        let row = r0 + sweep * 16u + lid / 16u;
        var top = 0.0;
        for (var j = j_begin + sub; j < j_end; j += 16u) {
            top = max(top, abs(load_a(row, j)));
        }
        row_top[lid] = top;
        workgroupBarrier();
        if (lid < 16u) {
            var m = 0.0;
            for (var t = 0u; t < 16u; t++) {
                m = max(m, row_top[lid * 16u + t]);
            }
            row_exp[sweep * 16u + lid] = half_scale_exp(m);
        }
        workgroupBarrier();
    }
}

// Stages a chunk as f16 (a_tile when `is_a`, each value times its row's scale; else times
// 2^HALF_B_EXP), and raises big_step to `step` for a chunk of B with a value of 2 or more.
fn put_half(is_a: bool, along: bool, lid: u32, c: Chunk, step: u32) {
    let limit = vec4<f32>(HALF_B_LIMIT);
    if (!is_a && (any(abs(c.lo) >= limit) || any(abs(c.hi) >= limit))) {
        atomicMax(&big_step, step);
    }
    if (along) {
        let at = along_rows(lid);
        let i = at.y * STRIDE4 + at.x / 4u;
        if (is_a) {
            let lo = vec4<i32>(row_exp[at.x], row_exp[at.x + 1u], row_exp[at.x + 2u], row_exp[at.x + 3u]);
            let hi = vec4<i32>(row_exp[at.x + 4u], row_exp[at.x + 5u], row_exp[at.x + 6u], row_exp[at.x + 7u]);
            a_tile[i] = vec4<f16>(ldexp(c.lo, lo));
            a_tile[i + 1u] = vec4<f16>(ldexp(c.hi, hi));
        } else {
            let e = vec4<i32>(HALF_B_EXP);
            b_tile[i] = vec4<f16>(ldexp(c.lo, e));
            b_tile[i + 1u] = vec4<f16>(ldexp(c.hi, e));
        }
        return;
    }
    let at = along_j(lid);
    let e = select(HALF_B_EXP, row_exp[at.x], is_a);
    for (var k = 0u; k < 8u; k++) {
        let v = f16(ldexp(select(c.hi[k % 4u], c.lo[k % 4u], k < 4u), e));
        let i = (at.y + k) * STRIDE4 + at.x / 4u;
        if (is_a) { a_tile[i][at.x % 4u] = v; } else { b_tile[i][at.x % 4u] = v; }
    }
}

// Row `i` of a thread's 8 (see above), within the block.
fn half_row(ty: u32, i: u32) -> u32 {
    return select(60u + 4u * ty + i, 4u * ty + i, i < 4u);
}

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    stage_code_table(lid);
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    scale_rows(r0, j_begin, j_end, lid);
    var acc0: array<vec4<f32>, 8>;                                 // rows (see above), columns 4tx..
    var acc1: array<vec4<f32>, 8>;                                 // the same rows, columns 64+4tx..
    var next_a = fetch_generic_a(r0, j_begin, lid);
    var next_b = fetch_b(c0, j_begin, lid);
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        let step = (j0 - j_begin) / BK + 1u;
        put_half(true, A_ALONG_ROWS, lid, next_a, step);
        put_half(false, B_ALONG_ROWS, lid, next_b, step);
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next_a = fetch_generic_a(r0, j0 + BK, lid);
            next_b = fetch_b(c0, j0 + BK, lid);
        }
        if (atomicLoad(&big_step) == step) {
            // Exactly in f32, from storage, scaled as the staged values are.
            for (var j = j0; j < j0 + BK; j++) {
                var b0: vec4<f32>;
                var b1: vec4<f32>;
                for (var e = 0u; e < 4u; e++) {
                    b0[e] = ldexp(load_b(c0 + 4u * tx + e, j), HALF_B_EXP);
                    b1[e] = ldexp(load_b(c0 + 64u + 4u * tx + e, j), HALF_B_EXP);
                }
                for (var i = 0u; i < 8u; i++) {
                    let row = half_row(ty, i);
                    let a = ldexp(load_a(r0 + row, j), row_exp[row]);
                    acc0[i] += a * b0;
                    acc1[i] += a * b1;
                }
            }
        } else {
            for (var run = 0u; run < BK; run += HALF_RUN) {
                var h0: array<vec4<f16>, 8>;
                var h1: array<vec4<f16>, 8>;
                for (var j = run; j < run + HALF_RUN; j++) {
                    let a0 = a_tile[j * STRIDE4 + ty];
                    let a1 = a_tile[j * STRIDE4 + 16u + ty];
                    let b0 = b_tile[j * STRIDE4 + tx];
                    let b1 = b_tile[j * STRIDE4 + 16u + tx];
#for i in 0..4
                    h0[{i}] += a0[{i}] * b0;
                    h1[{i}] += a0[{i}] * b1;
#end
#for i in 4..8
                    h0[{i}] += a1[{i-4}] * b0;
                    h1[{i}] += a1[{i-4}] * b1;
#end
                }
#for i in 0..8
                acc0[{i}] += vec4<f32>(h0[{i}]);
                acc1[{i}] += vec4<f32>(h1[{i}]);
#end
            }
        }
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output; the
    // scales come out in two steps, so that each power of two is a normal f32.
    let zr = wg.z * n_rows;
    for (var i = 0u; i < 8u; i++) {
        let row = half_row(ty, i);
        let unscale = vec4<i32>(-row_exp[row]);
        let b = vec4<i32>(-HALF_B_EXP);
        store4(zr + r0 + row, c0 + 4u * tx, ldexp(ldexp(acc0[i], b), unscale), zr + n_rows, n_cols);
        store4(zr + r0 + row, c0 + 64u + 4u * tx, ldexp(ldexp(acc1[i], b), unscale), zr + n_rows, n_cols);
    }
}
