// Embedding gather from an f16 table stored as packed pairs (lower half first):
// out[t, :] = f32(table[ids[t] - row_start, :]) * scale for ids inside this chunk of rows.
#include "common/embedding.wgsl"

@group(0) @binding(0) var<uniform> p: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;          // (T)
@group(0) @binding(2) var<storage, read> table: array<u32>;        // (row_count * C / 2) f16 pairs
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (T, C)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = table_index(gid.x, gid.y);
    if (i == NO_ROW) { return; }
    let pair = unpack2x16float(table[i / 2u]);
    out[gid.y * p.dim + gid.x] = select(pair.x, pair.y, i % 2u == 1u) * p.scale;
}
