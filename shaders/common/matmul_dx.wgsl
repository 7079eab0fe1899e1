// The input gradient of a linear layer over many rows, dx = dy W: the element loaders and the
// entry point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl), reducing over n.
// The including shader declares `dy` and `w_at(n, k)`, the weight element (n, k) in its
// storage format.

// For common/tile128.wgsl: dy is contiguous along n, the reduction; W along k, the output columns.
const A_ALONG_ROWS: bool = false;
const B_ALONG_ROWS: bool = true;

fn load_a(m: u32, n: u32) -> f32 {
    if (m >= p.m || n >= p.n) { return 0.0; }
    return dy[m * p.dy_stride + p.dy_col_offset + n];
}

fn load_b(k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) { return 0.0; }
    return w_at(n, k);
}

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_matmul(wg, lid, p.m, p.k, p.n);
}
