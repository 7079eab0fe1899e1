// The input gradient of a linear layer over many rows, dx = dy W: the element loaders and the
// entry point for common/matmul.wgsl, reducing over n. The including shader declares `dy` and
// `w_at(n, k)`, the weight element (n, k) in its storage format.

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
