// The forward pass of a linear layer over many rows, y = x W^T: the element loaders and the
// entry point for the tiled cores (common/matmul.wgsl, common/tile128.wgsl). The including
// shader declares `x` and `w_at(n, k)`, the weight element (n, k) in its storage format. Row m
// of x starts at m * x_stride + x_col_offset (K and 0 for a contiguous x; a LoRA B product reads
// its module's columns of an h that several modules share).

// For common/tile128.wgsl: x and W are both contiguous along k, the reduction.
const A_ALONG_ROWS: bool = false;
const B_ALONG_ROWS: bool = false;

fn load_a(m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    return x[m * p.x_stride + p.x_col_offset + k];
}

fn load_b(n: u32, k: u32) -> f32 {
    if (n >= p.n || k >= p.k) { return 0.0; }
    return w_at(n, k);
}

@compute @workgroup_size(TILE_THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_matmul(wg, lid, p.m, p.n, p.k);
}
