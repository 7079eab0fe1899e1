// The tile128 family's core for narrow products, the shapes a LoRA step is made of: x A^T (r
// columns, or 2r and 3r for the modules that share an input), dh = dy B (r columns), dB (r
// columns) and dA (r rows), all with a side of a few dozen where the other two sides are
// hundreds or thousands. The product of common/tile128.wgsl,
//   out[r, c] = sum_j A(r, j) * B(c, j)   for r < n_rows, c < n_cols, j < n_red,
// with the same split reduction (p.split_k) and epilogue (common/matmul_store.wgsl), on output
// blocks of 256 rows x 16 columns (the `.narrow` variants in shaders/src/lib.rs), or 16 rows x
// 256 columns (`.narrow_rows`: BR and BC overridden), where tile64's 64 x 64 blocks leave three
// quarters of their outputs idle for a side of 16:
//   - each of the 256 threads computes 4 x 4 outputs, rows 4ty.. by columns 4tx..
//     (tx = lid % (BC / 4), ty = lid / (BC / 4)), reading one vec4 of each staged operand for 16
//     multiply-adds a step, as tile64 does;
//   - the reduction runs in steps of BK = 8, the next step prefetched into registers while the
//     current one is multiplied;
//   - both operands are staged transposed, (BK, BR) and (BK, BC), unpadded: a step's 8 values of
//     one row ("along j", chunk c is row c) are written by consecutive threads to consecutive
//     floats of each staged row, 8 consecutive rows at one j ("along rows") as two vec4s, and the
//     reads are broadcasts (the narrow operand's 4 vec4s a row, the wide one's ty) or 32
//     consecutive vec4s (the wide operand along tx), so no two lanes of a subgroup meet on a bank;
//   - a step of an operand is as many chunks of 8 values as the block has rows (or columns) of
//     it: every thread fetches one chunk of the wide operand, and the first 16 one of the narrow.
// Only the dense kernels have this variant (a LoRA matrix, or its gradient, is an f32 operand),
// and the launcher gives it no fused LoRA product (whose columns start at a step of 16).
// Workgroup memory: 8.5 KiB of tiles (8,704 bytes: no more than tile64's).

const BR: u32 = 256u;
const BC: u32 = 16u;
const BK: u32 = 8u;
const TILE_THREADS: u32 = 256u;

// Chunk, and the fetchers that the including shader's `fetch_b` names (unused here).
#include "common/tile_fetch.wgsl"
#include "common/matmul_store.wgsl"

var<workgroup> a_tile: array<vec4<f32>, BK * BR / 4u>;
var<workgroup> b_tile: array<vec4<f32>, BK * BC / 4u>;

fn load_operand(is_a: bool, row: u32, j: u32) -> f32 {
    if (is_a) { return load_a(row, j); }
    return load_b(row, j);
}

// Chunk c of A's (is_a) or B's step at j0, the block's rows (or columns) from r0: along j, row
// c's 8 values; along rows, 8 rows from 8 (c % (len / 8)) at j0 + c / (len / 8).
fn fetch_chunk(is_a: bool, c: u32, r0: u32, j0: u32) -> Chunk {
    let along_rows = select(B_ALONG_ROWS, A_ALONG_ROWS, is_a);
    let per_j = select(BC, BR, is_a) / 8u;
    var v: array<f32, 8>;
    if (along_rows) {
        let r = r0 + (c % per_j) * 8u;
        let j = j0 + c / per_j;
        for (var e = 0u; e < 8u; e++) { v[e] = load_operand(is_a, r + e, j); }
    } else {
        for (var e = 0u; e < 8u; e++) { v[e] = load_operand(is_a, r0 + c, j0 + e); }
    }
    return Chunk(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

// Stages chunk c (as fetch_chunk numbers them) of A's (is_a) or B's step.
fn put_chunk(is_a: bool, c: u32, v: Chunk) {
    let along_rows = select(B_ALONG_ROWS, A_ALONG_ROWS, is_a);
    let len = select(BC, BR, is_a);
    let per_j = len / 8u;
    let row4 = len / 4u;                                           // vec4s a staged row
    if (along_rows) {
        let i = (c / per_j) * row4 + (c % per_j) * 2u;
        if (is_a) { a_tile[i] = v.lo; a_tile[i + 1u] = v.hi; } else { b_tile[i] = v.lo; b_tile[i + 1u] = v.hi; }
        return;
    }
    for (var e = 0u; e < 8u; e++) {
        let x = select(v.hi[e % 4u], v.lo[e % 4u], e < 4u);
        let i = e * row4 + c / 4u;
        if (is_a) { a_tile[i][c % 4u] = x; } else { b_tile[i][c % 4u] = x; }
    }
}

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tx = lid % (BC / 4u);
    let ty = lid / (BC / 4u);
    // The wide operand's chunks are one a thread; the narrow one's go to the first threads.
    let wide_is_a = BR > BC;
    let wide0 = select(c0, r0, wide_is_a);
    let narrow0 = select(r0, c0, wide_is_a);
    let fetches_narrow = lid < min(BR, BC);
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    var acc: array<vec4<f32>, 4>;                                  // rows 4ty.., columns 4tx..
    var next_wide = fetch_chunk(wide_is_a, lid, wide0, j_begin);
    var next_narrow = Chunk(vec4<f32>(0.0), vec4<f32>(0.0));
    if (fetches_narrow) { next_narrow = fetch_chunk(!wide_is_a, lid, narrow0, j_begin); }
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        put_chunk(wide_is_a, lid, next_wide);
        if (fetches_narrow) { put_chunk(!wide_is_a, lid, next_narrow); }
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next_wide = fetch_chunk(wide_is_a, lid, wide0, j0 + BK);
            if (fetches_narrow) { next_narrow = fetch_chunk(!wide_is_a, lid, narrow0, j0 + BK); }
        }
        for (var j = 0u; j < BK; j++) {
            let a = a_tile[j * (BR / 4u) + ty];
            let b = b_tile[j * (BC / 4u) + tx];
#for i in 0..4
            acc[{i}] += a[{i}] * b;
#end
        }
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output.
    let zr = wg.z * n_rows;
    for (var i = 0u; i < 4u; i++) {
        store4(zr + r0 + 4u * ty + i, c0 + 4u * tx, acc[i], zr + n_rows, n_cols);
    }
}
