// The tile128 family's core for small grids: the product of common/tile128.wgsl,
//   out[r, c] = sum_j A(r, j) * B(c, j)   for r < n_rows, c < n_cols, j < n_red,
// with the same split reduction (p.split_k) and epilogue (common/matmul_store.wgsl), on 64 x 64
// output blocks, four times as many workgroups as 128 x 128 ones give a product (a product of
// 512 rows has 4 block rows of 128: too few workgroups to fill a large GPU). It stands in for
// common/tile128.wgsl in every tile128 matmul kernel (the `.tile64` variants in
// shaders/src/lib.rs), which the launcher picks for a product whose 128 x 128 grid is small.
// Blocked as tile128 is, where portable's 64 x 64 core (common/matmul.wgsl) is not:
//   - each of the 256 threads computes 4 x 4 outputs, rows 4ty.. by columns 4tx.. (tx = lid % 16,
//     ty = lid / 16), reading one vec4 of each staged operand for 16 multiply-adds a step (the
//     portable core reads 8 scalars);
//   - the tiles are staged transposed, (BK, 64) with rows padded to 68 floats
//     (common/tile_stage.wgsl): a row of the reduction is read as 16 consecutive vec4s across
//     the 16 threads that share ty, no two lanes of a subgroup on one bank, and the staging
//     writes have at most two a bank (the portable core's put 16 lanes on one);
//   - the reduction runs in steps of BK = 16, prefetched into registers while the step before is
//     multiplied, as tile128's;
//   - threads 0..127 fetch A and 128..255 fetch B, 8 values each a step, through the fetchers
//     of common/tile_fetch.wgsl (consecutive threads at consecutive addresses along j or along
//     rows; an NF4 weight one packed word of 8 codes a thread), so whole subgroups take one
//     branch.
// Workgroup memory: 8.5 KiB of tiles and the 16-entry NF4 code table.

const BR: u32 = 64u;
const BC: u32 = 64u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;

#include "common/tile_fetch.wgsl"
#include "common/tile_stage.wgsl"
#include "common/matmul_store.wgsl"

// The chunk thread `lid` fetches for the step at j0: A's for threads 0..127, B's for the rest.
fn fetch_own(lid: u32, r0: u32, c0: u32, j0: u32) -> Chunk {
    if (lid < 128u) { return fetch_generic_a(r0, j0, lid); }
    return fetch_b(c0, j0, lid - 128u);
}

fn tiled_matmul(wg: vec3<u32>, lid: u32, n_rows: u32, n_cols: u32, n_red: u32) {
    stage_code_table(lid);
    let r0 = wg.y * BR;
    let c0 = wg.x * BC;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let is_a = lid < 128u;
    let along = select(B_ALONG_ROWS, A_ALONG_ROWS, is_a);
    let slice = reduction_slice(wg.z, n_red);
    let j_begin = slice.x;
    let j_end = slice.y;
    var acc: array<vec4<f32>, 4>;                                  // rows 4ty.., columns 4tx..
    var next = fetch_own(lid, r0, c0, j_begin);
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        put(is_a, along, lid % 128u, next);
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next = fetch_own(lid, r0, c0, j0 + BK);
        }
        for (var j = 0u; j < BK; j++) {
            let a = a_tile[j * STRIDE4 + ty];
            let b = b_tile[j * STRIDE4 + tx];
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
