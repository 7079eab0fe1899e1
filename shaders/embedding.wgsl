// Embedding gather: out[t, :] = table[ids[t] - row_start, :] for ids inside this chunk of rows.
// The table may be split in row chunks to respect max_storage_buffer_binding_size; each chunk is
// one dispatch, and rows outside it are left untouched.
struct EmbeddingParams {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    row_count: u32,
}

@group(0) @binding(0) var<uniform> p: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;          // (T)
@group(0) @binding(2) var<storage, read> table: array<f32>;        // (row_count, C)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (T, C)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if (c >= p.dim || t >= p.n_tokens) { return; }
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.row_count) { return; }
    out[t * p.dim + c] = table[(id - p.row_start) * p.dim + c];
}
