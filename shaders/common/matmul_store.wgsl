// The epilogue of every many-row matmul kernel: writes four columns of one output row,
// y[row_start(row) + col + j] = alpha * v[j] (+ bias[col + j]), or adds that to y when
// `accumulate` is set (LoRA's second matmul, gradient accumulation). Rows and columns past the
// matrix are skipped. The including shader declares `p` (MatmulParams), `bias` and `y`.

// The slice [x, y) of the reduction 0..n_red that workgroup z reduces: all of it, or its z-th
// p.split_k when the reduction is split (the slices' sums then go to the scratch output, which
// matmul_split_reduce.wgsl adds up before this epilogue).
fn reduction_slice(z: u32, n_red: u32) -> vec2<u32> {
    if (p.split_k == 0u) { return vec2<u32>(0u, n_red); }
    let begin = z * p.split_k;
    return vec2<u32>(begin, min(n_red, begin + p.split_k));
}

// Where output row `row` starts in y: row * y_stride + y_col_offset; or, with y_seg_rows set,
// its rows in blocks of y_seg_rows, block b's first at y_col_offset, y_offset1 or y_offset2
// (the A gradients of up to three LoRA modules that read one input, computed as one product
// and each written where the adapter keeps its A).
fn row_start(row: u32) -> u32 {
    if (p.y_seg_rows == 0u) { return row * p.y_stride + p.y_col_offset; }
    let b = row / p.y_seg_rows;
    let first = select(select(p.y_col_offset, p.y_offset1, b == 1u), p.y_offset2, b >= 2u);
    return first + (row % p.y_seg_rows) * p.y_stride;
}

fn store4(row: u32, col: u32, v: vec4<f32>, n_rows: u32, n_cols: u32) {
    if (row >= n_rows) { return; }
    for (var j = 0u; j < 4u; j++) {
        let c = col + j;
        if (c < n_cols) {
            var out = p.alpha * v[j];
            if (p.has_bias != 0u) { out += bias[c]; }
            let i = row_start(row) + c;
            if (p.accumulate != 0u) { out += y[i]; }
            y[i] = out;
        }
    }
}
