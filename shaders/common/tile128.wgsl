// The `tile128` matmul family for GPUs: the same product as common/matmul.wgsl,
//   out[r, c] = sum_j A(r, j) * B(c, j)   for r < n_rows, c < n_cols, j < n_red,
// with the same split reduction (p.split_k) and epilogue (common/matmul_store.wgsl), blocked
// for a GPU's registers and workgroup memory:
//   - a workgroup of 256 threads computes a 128 x 128 output block; each thread 8 x 8 of it, as
//     rows {4ty..4ty+3, 64+4ty..64+4ty+3} by columns {4tx..4tx+3, 64+4tx..64+4tx+3}
//     (tx = lid % 16, ty = lid / 16), so one step of the reduction reads 4 vec4s from workgroup
//     memory for 64 multiply-adds (the 64 x 64 tiles read 8 scalars for 16);
//   - the tiles are staged transposed, (BK, 128) with rows padded to 132 floats: a row of the
//     reduction is read as vec4s, 16 consecutive ones across the 16 threads that share ty, which
//     no two lanes of a subgroup take from one bank; the staging writes have at most two;
//   - the reduction runs in steps of BK = 16, prefetched: the next step's operands are loaded
//     from storage into registers while the current step's are multiplied out of workgroup
//     memory (double buffering through registers, which leaves workgroup memory at 17 KiB);
//   - each thread stages 8 values of each operand a step: 8 consecutive j of one row (the
//     "along j" map, when the operand is contiguous in j: x and W in the forward pass, dy in the
//     input gradient) or 8 consecutive rows at one j (the "along rows" map: W in the input
//     gradient, dy and x in the weight gradient), so consecutive threads read consecutive
//     addresses either way. An NF4 operand is fetched one packed word (8 codes) per thread,
//     dequantized through a 16-entry table in workgroup memory.
//
// The including shader declares `p` (MatmulParams), `bias`, `y`, the element loaders
// `load_a(row, j)` and `load_b(col, j)` (0 outside the matrix, as for common/matmul.wgsl), the
// maps `A_ALONG_ROWS` and `B_ALONG_ROWS`, and `fetch_b(c0, j0, lid) -> Chunk`, which is
// `fetch_generic_b` unless the weight has a faster path (NF4 words).

const BR: u32 = 128u;
const BC: u32 = 128u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;

#include "common/tile_fetch.wgsl"
#include "common/tile_stage.wgsl"
#include "common/matmul_store.wgsl"

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    stage_code_table(lid);
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    var acc0: array<vec4<f32>, 8>;                                 // rows (see above), columns 4tx..
    var acc1: array<vec4<f32>, 8>;                                 // the same rows, columns 64+4tx..
    var next_a = fetch_generic_a(r0, j_begin, lid);
    var next_b = fetch_b(c0, j_begin, lid);
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        put(true, A_ALONG_ROWS, lid, next_a);
        put(false, B_ALONG_ROWS, lid, next_b);
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next_a = fetch_generic_a(r0, j0 + BK, lid);
            next_b = fetch_b(c0, j0 + BK, lid);
        }
        for (var j = 0u; j < BK; j++) {
            let a0 = a_tile[j * STRIDE4 + ty];
            let a1 = a_tile[j * STRIDE4 + 16u + ty];
            let b0 = b_tile[j * STRIDE4 + tx];
            let b1 = b_tile[j * STRIDE4 + 16u + tx];
#for i in 0..4
            acc0[{i}] += a0[{i}] * b0;
            acc1[{i}] += a0[{i}] * b1;
#end
#for i in 4..8
            acc0[{i}] += a1[{i-4}] * b0;
            acc1[{i}] += a1[{i-4}] * b1;
#end
        }
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output.
    let zr = wg.z * n_rows;
    for (var i = 0u; i < 8u; i++) {
        let row = zr + r0 + select(60u + 4u * ty + i, 4u * ty + i, i < 4u);
        store4(row, c0 + 4u * tx, acc0[i], zr + n_rows, n_cols);
        store4(row, c0 + 64u + 4u * tx, acc1[i], zr + n_rows, n_cols);
    }
}
