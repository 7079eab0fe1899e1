// The operands of rms_norm_backward.wgsl: one (n_rows, dim) tensor x, its weight w, the
// output's gradient dy and the input's gradient dx, added to.

@group(0) @binding(1) var<storage, read> x: array<f32>;            // (N, C)
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read> dy: array<f32>;           // (N, C)
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // (N, C), accumulated

fn rows() -> u32 { return p.n_rows; }

fn x_at(row: u32, c: u32) -> f32 { return x[row * p.dim + c]; }

// w[c] * dy[row, c].
fn wdy_at(row: u32, c: u32) -> f32 { return w[c] * dy[row * p.dim + c]; }

fn add_dx(row: u32, c: u32, v: f32) { dx[row * p.dim + c] += v; }
