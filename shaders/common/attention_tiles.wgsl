// The register-tiled products of the tiled families' attention kernels (attention_t128.wgsl and
// its two backward passes), FlashAttention-2's blocking written as small matmuls. A workgroup of
// 256 threads works on a tile of 64 "rows" (queries, or keys in the dK/dV pass) against 64
// "columns" (keys, or queries); thread (tr = lid / 16, tc = lid % 16) owns the 4 x 4 block of
// rows 4 tr .. + 4 and columns 4 tc .. + 4, and 4 rows x 8 dims of what it accumulates over a
// block of 128 dims of the head from d0 (dims d0 + 4 tc .. + 4 and d0 + 64 + 4 tc .. + 4): a head
// of up to 128 dims is one block; a wider one (Gemma's 256) takes a walk over the tiles a block,
// each computing the scores again, so that the accumulators and workgroup memory stay this size.
//   - block_product: sum_d A(row, d) B(col, d) over the head in chunks of 16 dims, both operands
//     staged transposed (a vec4 of 4 rows or 4 columns a dim): 2 vec4 reads for 16 multiply-adds.
//   - store_block_t then accumulate: out(row, dims) += sum_col M(row, col) C(col, dims), M
//     written transposed to `pt` (column * PS + row / 4, rows 17 vec4s apart, so that the 16
//     threads of a row group writing meet at most 2 to a bank) and C staged 16 columns at a time:
//     3 vec4 reads for 32 multiply-adds.
//   - rows_max and rows_sum reduce 4 values a row over the 16 threads of a row group
//     (common/attention_rows*.wgsl: subgroup shuffles where the adapter has them).
// The including kernel declares `p` (AttentionParams), `key_start` and fn operand(which, i, d) ->
// f32: element d of row i (0 .. 63) of the current tile of operand `which`, 0 past its end.

const PS: u32 = 17u;
// A chunk of A^T at [0, 256) and of B^T at [256, 512), element (dim dd, row i) at dd * 16 + i / 4,
// lane i % 4; a chunk of C (16 columns, 128 dims) at column * 32 + dim / 4; reductions' partials
// at [0, 256).
var<workgroup> stage: array<vec4<f32>, 512>;
var<workgroup> pt: array<vec4<f32>, 1088>;                         // M^T: column * PS + row / 4

#include "common/attention_rows.wgsl"

// The keys that any of the 64 queries from t0 sees: the smallest of their key_start (not
// assumed monotonic) ..= the last one's position.
fn block_keys(t0: u32) -> vec2<u32> {
    let t_last = min(t0 + 64u, p.n_tokens) - 1u;
    var lo = key_start[t0];
    for (var r = t0 + 1u; r <= t_last; r++) { lo = min(lo, key_start[r]); }
    return vec2<u32>(lo, p.pos_offset + t_last);
}

// This thread's 4 x 4 block of A B^T over the head: element [i][c] is row 4 tr + i, column
// 4 tc + c. Called by every thread (it holds barriers).
fn block_product(a: u32, b: u32, lid: u32) -> array<vec4<f32>, 4> {
    var s: array<vec4<f32>, 4>;
    let row = lid / 4u;
    let dd0 = (lid % 4u) * 4u;
    let tr = lid / 16u;
    let tc = lid % 16u;
    for (var c0 = 0u; c0 < p.head_dim; c0 += 16u) {
        for (var e = 0u; e < 4u; e++) {
            let dd = dd0 + e;
            var va = 0.0;
            var vb = 0.0;
            if (c0 + dd < p.head_dim) {
                va = operand(a, row, c0 + dd);
                vb = operand(b, row, c0 + dd);
            }
            stage[dd * 16u + row / 4u][row % 4u] = va;
            stage[256u + dd * 16u + row / 4u][row % 4u] = vb;
        }
        workgroupBarrier();
        for (var dd = 0u; dd < 16u; dd++) {
            let x = stage[dd * 16u + tr];
            let y = stage[256u + dd * 16u + tc];
            s[0] += x.x * y;
            s[1] += x.y * y;
            s[2] += x.z * y;
            s[3] += x.w * y;
        }
        workgroupBarrier();
    }
    return s;
}

// Writes this thread's block of M (as block_product lays it out) into `pt`, transposed. The
// next accumulate's first barrier makes it visible.
fn store_block_t(m: array<vec4<f32>, 4>, lid: u32) {
    let tr = lid / 16u;
    let tc = lid % 16u;
    for (var c = 0u; c < 4u; c++) {
        pt[(4u * tc + c) * PS + tr] = vec4<f32>(m[0][c], m[1][c], m[2][c], m[3][c]);
    }
}

// o[2 i + half] += sum over the tile's 64 columns of M(4 tr + i, column) C(column, d0 + dims of
// half), M from `pt` and C = operand `c`, d0 a multiple of 128 below head_dim. Called by every
// thread (it holds barriers).
fn accumulate(o: ptr<function, array<vec4<f32>, 8>>, c: u32, d0: u32, lid: u32) {
    let tr = lid / 16u;
    let tc = lid % 16u;
    let dims = select(128u, 64u, p.head_dim - d0 <= 64u);          // dims of C staged
    for (var k0 = 0u; k0 < 64u; k0 += 16u) {
        for (var i = lid; i < 16u * dims; i += 256u) {
            let jj = i / dims;
            let d = i % dims;
            var v = 0.0;
            if (d0 + d < p.head_dim) { v = operand(c, k0 + jj, d0 + d); }
            stage[jj * 32u + d / 4u][d % 4u] = v;
        }
        workgroupBarrier();
        for (var jj = 0u; jj < 16u; jj++) {
            let m = pt[(k0 + jj) * PS + tr];
            let v0 = stage[jj * 32u + tc];
            let v1 = stage[jj * 32u + 16u + tc];
            for (var i = 0u; i < 4u; i++) {
                (*o)[2u * i] += m[i] * v0;
                (*o)[2u * i + 1u] += m[i] * v1;
            }
        }
        workgroupBarrier();
    }
}

// The maximum of each of 4 rows over the 16 threads of this thread's row group (lid / 16), in
// every one of them. Called by every thread (it holds barriers); `stage` holds the partials.
fn rows_max(x: vec4<f32>, lid: u32, lanes: u32) -> vec4<f32> {
    stage[lid] = lanes_max(x, lanes);
    workgroupBarrier();
    let base = lid & ~15u;
    var m = stage[base];
    for (var g = lanes; g < 16u; g += lanes) { m = max(m, stage[base + g]); }
    workgroupBarrier();
    return m;
}

// The sum of each of 4 rows over the 16 threads of this thread's row group, as rows_max.
fn rows_sum(x: vec4<f32>, lid: u32, lanes: u32) -> vec4<f32> {
    stage[lid] = lanes_sum(x, lanes);
    workgroupBarrier();
    let base = lid & ~15u;
    var s = stage[base];
    for (var g = lanes; g < 16u; g += lanes) { s += stage[base + g]; }
    workgroupBarrier();
    return s;
}
