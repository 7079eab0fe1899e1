// How the tiled cores of the tile128 family (common/tile128.wgsl, common/tile64.wgsl,
// common/coop16.wgsl, common/coop8.wgsl) fetch their operands from storage: each thread that
// fetches an operand (all 256 of a 128 x 128 block; 128 of a 64 x 64 one, `lid` numbering them)
// loads 8 values of it per reduction step of 16, either 8 consecutive j of one row ("along j")
// or 8 consecutive rows at one j ("along rows"), as `Chunk`s, which the core then stages in its
// own layout. The core declares BR, its block's rows (and columns). An NF4 weight is fetched
// one packed word (8 codes) per thread through `code_table`, which the core fills
// (stage_code_table) before its first fetch.
//
// The including shader declares `load_a(row, j)`, `load_b(col, j)` (0 outside the matrix) and
// the maps `A_ALONG_ROWS` and `B_ALONG_ROWS`.
#include "common/nf4_code.wgsl"

var<workgroup> code_table: array<f32, 16>;                         // NF4 code book

// Fills code_table from NF4_CODE, before the core's first fetch (every thread calls it).
fn stage_code_table(lid: u32) {
    if (lid < 16u) { code_table[lid] = NF4_CODE[lid]; }
    workgroupBarrier();
}

// The 8 values one thread stages of one operand a step.
struct Chunk {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Where a thread's chunk lies: (first row or column, first j) of the block's step.
fn along_j(lid: u32) -> vec2<u32> {
    return vec2<u32>(lid / 2u, (lid % 2u) * 8u);
}

// (BR rows of the block, the core's: BR / 8 threads cover a step's row of the reduction.)
fn along_rows(lid: u32) -> vec2<u32> {
    return vec2<u32>((lid % (BR / 8u)) * 8u, lid / (BR / 8u));
}

fn fetch_generic_a(r0: u32, j0: u32, lid: u32) -> Chunk {
    var v: array<f32, 8>;
    if (A_ALONG_ROWS) {
        let at = along_rows(lid);
        for (var e = 0u; e < 8u; e++) { v[e] = load_a(r0 + at.x + e, j0 + at.y); }
    } else {
        let at = along_j(lid);
        for (var e = 0u; e < 8u; e++) { v[e] = load_a(r0 + at.x, j0 + at.y + e); }
    }
    return Chunk(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

fn fetch_generic_b(c0: u32, j0: u32, lid: u32) -> Chunk {
    var v: array<f32, 8>;
    if (B_ALONG_ROWS) {
        let at = along_rows(lid);
        for (var e = 0u; e < 8u; e++) { v[e] = load_b(c0 + at.x + e, j0 + at.y); }
    } else {
        let at = along_j(lid);
        for (var e = 0u; e < 8u; e++) { v[e] = load_b(c0 + at.x, j0 + at.y + e); }
    }
    return Chunk(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

// The 8 code values of a packed NF4 word, in element order, times the block's scale plus its
// minimum (`c`, from the code snippet's block_coeffs; the minimum is 0 but for affine codes).
fn nf4_word(word: u32, c: vec2<f32>) -> Chunk {
    var v: array<f32, 8>;
    for (var e = 0u; e < 8u; e++) {
        let shift = 8u * (e / 2u) + select(0u, 4u, e % 2u == 0u);
        v[e] = code_table[(word >> shift) & 0xFu] * c.x + c.y;
    }
    return Chunk(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

