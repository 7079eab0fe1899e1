// The operands of rms_norm_backward.wgsl's pair variant: two tensors of the same width, rows
// [0, n_rows) from x (weight w, gradients dy and dx) and the next n_rows2 from x2 (w2, dy2, dx2).

@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read> dy: array<f32>;           // (N, C)
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // (N, C), accumulated
@group(0) @binding(5) var<storage, read> x2: array<f32>;           // (N2, C)
@group(0) @binding(6) var<storage, read> w2: array<f32>;           // (C)
@group(0) @binding(7) var<storage, read> dy2: array<f32>;          // (N2, C)
@group(0) @binding(8) var<storage, read_write> dx2: array<f32>;    // (N2, C), accumulated

fn rows() -> u32 { return p.n_rows + p.n_rows2; }

fn x_at(row: u32, c: u32) -> f32 {
    if (row < p.n_rows) { return x[row * p.dim + c]; }
    return x2[(row - p.n_rows) * p.dim + c];
}

// w[c] * dy[row, c], in the tensor the row belongs to.
fn wdy_at(row: u32, c: u32) -> f32 {
    if (row < p.n_rows) { return w[c] * dy[row * p.dim + c]; }
    return w2[c] * dy2[(row - p.n_rows) * p.dim + c];
}

fn add_dx(row: u32, c: u32, v: f32) {
    if (row < p.n_rows) {
        dx[row * p.dim + c] += v;
    } else {
        dx2[(row - p.n_rows) * p.dim + c] += v;
    }
}
