// Shared by embedding.wgsl and embedding_f16.wgsl. The table may be split in row chunks to
// respect max_storage_buffer_binding_size; each chunk is one dispatch, and ids outside it are
// left to the other chunks. The including shader declares `p` and `ids`.
struct EmbeddingParams {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    row_count: u32,
    scale: f32,       // every row is multiplied by it (Gemma: sqrt(hidden size); else 1)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const NO_ROW: u32 = 0xFFFFFFFFu;

// Index into this chunk's (row_count, C) table of output element (t, c), or NO_ROW.
fn table_index(c: u32, t: u32) -> u32 {
    if (c >= p.dim || t >= p.n_tokens) { return NO_ROW; }
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.row_count) { return NO_ROW; }
    return (id - p.row_start) * p.dim + c;
}
