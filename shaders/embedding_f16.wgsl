// Embedding gather from an f16 table stored as packed pairs (lower half first):
// out[t, :] = f32(table[ids[t] - row_start, :]) for ids inside this chunk of rows.
struct EmbeddingParams {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    row_count: u32,
}

@group(0) @binding(0) var<uniform> p: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;          // (T)
@group(0) @binding(2) var<storage, read> table: array<u32>;        // (row_count * C / 2) f16 pairs
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (T, C)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if (c >= p.dim || t >= p.n_tokens) { return; }
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.row_count) { return; }
    let flat = (id - p.row_start) * p.dim + c;
    let pair = unpack2x16float(table[flat / 2u]);
    out[t * p.dim + c] = select(pair.x, pair.y, flat % 2u == 1u);
}
