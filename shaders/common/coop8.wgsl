// The `coop8` matmul core: the product of common/tile128.wgsl,
//   out[r, c] = sum_j A(r, j) * B(c, j),
// on the GPU's matrix units through cooperative matrices (wgpu's
// EXPERIMENTAL_COOPERATIVE_MATRIX) of 8 x 8 x 8 with f32 operands and f32 accumulators: the
// configuration Apple GPUs list (Metal's simdgroup_matrix). It stands in for common/tile128.wgsl
// in every tile128 matmul kernel, forward, input and weight gradients (variants in
// shaders/src/lib.rs): the operands stay f32, so its sums round as tile128's do and no product
// needs coop16's f16 row scaling. The matrix operations are in common/coop8_mma.wgsl (its
// `enable` line moves to the top of the module when it is expanded); the variants that swap in
// common/coop8_mma_emulated.wgsl run everything else here on adapters without matrix units.
//
//   - A workgroup of 256 threads, 8 subgroups of 32, computes a 128 x 128 output block; subgroup
//     s owns rows 32 (s / 2) .. + 32 and columns 64 (s % 2) .. + 64: 4 x 8 accumulator fragments,
//     f{8 i + j} at rows 8 i .., columns 8 j .. of that.
//   - Operands are fetched as in common/tile128.wgsl (common/tile_fetch.wgsl: 8 values a thread
//     a step of 16, prefetched into registers while the step before is multiplied) and staged
//     transposed, (16, 136) floats: A column-major (element (r, j) at j * 136 + r) and B
//     row-major as a (K, N) matrix (element (j, c) at B_AT + j * 136 + c), so that a fragment is
//     one coopLoad / coopLoadT with stride 136. A stride of 136 puts the 8 rows of a fragment on
//     banks 8 apart, 4 rows to the 32 banks.
//   - After the reduction the staging memory is the epilogue's scratch: each subgroup stores a
//     row of its 8 fragments (8 x 64 floats) there and its lanes write it out through
//     common/matmul_store.wgsl (split reduction, alpha, bias, accumulation), 4 vec4s a lane.
//
// Subgroups are assumed to be 32 lanes; the start-up self-test (gpu/probe.rs) is what makes
// sure, and a failure leaves the family unused.

const BR: u32 = 128u;
const BC: u32 = 128u;
const BK: u32 = 16u;
const TILE_THREADS: u32 = 256u;
const FS: u32 = 136u;                                              // floats per staged row
const B_AT: u32 = 2176u;                                           // where B's (BK, FS) tile starts
var<workgroup> stage: array<f32, 4352>;                            // A's tile, then B's; the epilogue's scratch

#include "common/tile_fetch.wgsl"
#include "common/matmul_store.wgsl"
#include "common/coop8_mma.wgsl"

// Stores a chunk into a staged tile (A's at 0, B's at B_AT): along j it is one column of 8
// rows of the transposed tile, along rows 8 consecutive floats of one row.
fn put_f32(tile: u32, along: bool, lid: u32, c: Chunk) {
    let v = array<f32, 8>(c.lo.x, c.lo.y, c.lo.z, c.lo.w, c.hi.x, c.hi.y, c.hi.z, c.hi.w);
    if (along) {
        let at = along_rows(lid);
        for (var e = 0u; e < 8u; e++) { stage[tile + at.y * FS + at.x + e] = v[e]; }
    } else {
        let at = along_j(lid);
        for (var e = 0u; e < 8u; e++) { stage[tile + (at.y + e) * FS + at.x] = v[e]; }
    }
}

// Writes out the row of fragments subgroup `s` stored at stage[512 s ..] (8 rows of 64
// columns, row-major): output rows row0.., columns col0..; lane l takes 4 of the 128 vec4s.
fn flush_fragments(s: u32, lane: u32, row0: u32, col0: u32, n_rows: u32, n_cols: u32) {
    workgroupBarrier();
    for (var q = 0u; q < 4u; q++) {
        let at = q * 32u + lane;
        let r = at / 16u;
        let c = (at % 16u) * 4u;
        let i = s * 512u + r * 64u + c;
        store4(row0 + r, col0 + c, vec4<f32>(stage[i], stage[i + 1u], stage[i + 2u], stage[i + 3u]), n_rows, n_cols);
    }
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
    mma_lane(lane);
#for i in 0..32
    var f{i} = AccFrag();
#end
    var next_a = fetch_generic_a(r0, j_begin, lid);
    var next_b = fetch_b(c0, j_begin, lid);
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        put_f32(0u, A_ALONG_ROWS, lid, next_a);
        put_f32(B_AT, B_ALONG_ROWS, lid, next_b);
        workgroupBarrier();
        if (j0 + BK < j_end) {
            next_a = fetch_generic_a(r0, j0 + BK, lid);
            next_b = fetch_b(c0, j0 + BK, lid);
        }
        for (var kk = 0u; kk < BK; kk += 8u) {
#for i in 0..4
            let a{i} = load_a_frag(kk * FS + sr + 8u * {i});
#end
#for i in 0..8
            let b{i} = load_b_frag(B_AT + kk * FS + sc + 8u * {i});
#end
#for i in 0..32
            f{i} = mma(a{i / 8}, b{i % 8}, f{i});
#end
        }
        workgroupBarrier();
    }
    // Slice z of a split reduction lands z * n_rows rows further down the scratch output.
    let zr = wg.z * n_rows;
    let rows = zr + r0 + sr;
    let cols = c0 + sc;
    let end = zr + n_rows;
#for i in 0..8
    store_frag(f{i}, s * 512u + 8u * {i}, 64u);
#end
    flush_fragments(s, lane, rows, cols, end, n_cols);
#for i in 8..16
    store_frag(f{i}, s * 512u + 8u * {i % 8}, 64u);
#end
    flush_fragments(s, lane, rows + 8u, cols, end, n_cols);
#for i in 16..24
    store_frag(f{i}, s * 512u + 8u * {i % 8}, 64u);
#end
    flush_fragments(s, lane, rows + 16u, cols, end, n_cols);
#for i in 24..32
    store_frag(f{i}, s * 512u + 8u * {i % 8}, 64u);
#end
    flush_fragments(s, lane, rows + 24u, cols, end, n_cols);
}
