// The operands of rms_norm.wgsl's pair variant: two tensors of the same width, rows [0,
// n_rows) from x (weight w, output y) and the next n_rows2 from x2 (weight w2, output y2).

@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;      // (N, C)
@group(0) @binding(4) var<storage, read> x2: array<f32>;           // (N2, C)
@group(0) @binding(5) var<storage, read> w2: array<f32>;           // (C)
@group(0) @binding(6) var<storage, read_write> y2: array<f32>;     // (N2, C)

fn rows() -> u32 { return p.n_rows + p.n_rows2; }

fn x_at(row: u32, c: u32) -> f32 {
    if (row < p.n_rows) { return x[row * p.dim + c]; }
    return x2[(row - p.n_rows) * p.dim + c];
}

// y = w * (the normed value), in the tensor the row belongs to.
fn store_scaled(row: u32, c: u32, v: f32) {
    if (row < p.n_rows) {
        y[row * p.dim + c] = w[c] * v;
    } else {
        y2[(row - p.n_rows) * p.dim + c] = w2[c] * v;
    }
}
