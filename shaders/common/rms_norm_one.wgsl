// The operands of rms_norm.wgsl: one (n_rows, dim) tensor x, its weight w and the output y.

@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;      // (N, C)

fn rows() -> u32 { return p.n_rows; }

fn x_at(row: u32, c: u32) -> f32 { return x[row * p.dim + c]; }

// y = w * (the normed value).
fn store_scaled(row: u32, c: u32, v: f32) { y[row * p.dim + c] = w[c] * v; }
