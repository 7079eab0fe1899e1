// Gathered LoRA for a batch whose rows each carry their own adapter (decoding many sequences at
// once, each with its user's adapter, as S-LoRA and Punica do): every resident adapter's A and
// B matrices sit in one buffer `w`, and `table` gives each row's slices for the module being
// run, so the base product stays one product over every row. Two entry points (B_PRODUCT):
//   the A product (B_PRODUCT = 0), for `modules` modules that read the same x (q, k and v; gate
//     and up), their table entries `n_rows` apart: h[t, i * width + j] = x[t, :] . A_ti[j, :]
//     for module i and j < width (0 past the row's rank): a workgroup per (i * width + j, t),
//     its 64 lanes over the n_in inputs;
//   the B product (B_PRODUCT = 1), for one module: y[t, o] += scale_t * h[t, h_col + (0 ..
//     rank_t)] . B_t[o, :]: a lane per (o, t). (The many-row products fuse it instead where
//     they can: common/lora_table.wgsl.)
// A_t is (rank_t, n_in) at w[a_t], B_t (n_out, rank_t) at w[b_t]; a row with rank 0 (no adapter,
// or one that leaves the module out) gets h = 0 and y as it was.
struct LoraRowsParams {
    n_rows: u32,
    n_in: u32,
    n_out: u32,
    width: u32,       // a module's columns in h: the largest rank among the rows
    table_row: u32,   // the (first) module's first entry in `table`; row t's is table_row + t
    modules: u32,     // A: the modules side by side in h
    h_stride: u32,    // h's row stride
    h_col: u32,       // B: the module's first column in h
}

const B_PRODUCT: u32 = 0u;

@group(0) @binding(0) var<uniform> p: LoraRowsParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;             // A: (n_rows, n_in); B: h (n_rows, h_stride)
@group(0) @binding(2) var<storage, read> w: array<f32>;             // every adapter's A and B
@group(0) @binding(3) var<storage, read> table: array<vec4<u32>>;   // (a, b, rank, scale bits) a row
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // A: h (n_rows, h_stride); B: (n_rows, n_out)

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wg.y;
    if (B_PRODUCT == 1u) {
        let o = wg.x * 64u + lid;
        if (t >= p.n_rows || o >= p.n_out) { return; }
        let e = table[p.table_row + t];
        var acc = 0.0;
        for (var j = 0u; j < e.z; j++) {
            acc += x[t * p.h_stride + p.h_col + j] * w[e.y + o * e.z + j];
        }
        if (e.z > 0u) {
            y[t * p.n_out + o] += bitcast<f32>(e.w) * acc;
        }
        return;
    }
    // The grid is (modules * width, n_rows): every workgroup is inside it, so the barriers below
    // are reached by all of its lanes.
    let j = wg.x % p.width;
    let e = table[p.table_row + wg.x / p.width * p.n_rows + t];
    let n = select(0u, p.n_in, j < e.z);
    var acc = 0.0;
    for (var k = lid; k < n; k += 64u) {
        acc += x[t * p.n_in + k] * w[e.x + j * p.n_in + k];
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { partial[lid] += partial[lid + s]; }
        workgroupBarrier();
    }
    if (lid == 0u) { y[t * p.h_stride + wg.x] = partial[0]; }
}
