// Gathered LoRA fused into a many-row forward product: each row has its own adapter (decoding
// several sequences at once, each with its user's adapter; lora_rows.wgsl has put each row's
// x A^T in h). Only the pipelines made with the constant ROWS_LORA run it; every other pipeline
// of the same kernel has it off, so the code below is dead there and costs its compile nothing.
// `aux` is the table of lora_rows.wgsl, four words a row from entry p.lora_b on: (A's first
// element, B's first element in lora_b, rank, scale bits), rank 0 for a row without this
// module's adapter. Row m's x A^T is a slot of p.lora_rank values (the largest rank; 0 past the
// row's own) from h[m * lora_h_stride + lora_h], and row m gets
//   y[m, n] = x[m, :] . W[n, :] + scale_m * h[m, :rank_m] . B_m[n, :]   (B_m: (n_out, rank_m)).
// The tiled cores sum it as more of the reduction: after K come p.m slots of p.lora_rank
// columns, slot s nonzero for row s alone. The simd8 kernels add it in their epilogue. The
// scales are applied as they are, so alpha is 1. The including shader declares `p`,
// `aux: array<u32>` and `lora_b`.
override ROWS_LORA: bool = false;

// Row m's table entry: (A, B, rank, scale bits).
fn lora_entry(m: u32) -> vec4<u32> {
    let i = 4u * (p.lora_b + m);
    return vec4<u32>(aux[i], aux[i + 1u], aux[i + 2u], aux[i + 3u]);
}

// Element (n, j) of the B of the row whose entry is e, times its scale; 0 past its rank.
fn lora_entry_b(e: vec4<u32>, n: u32, j: u32) -> f32 {
    if (j >= e.z) { return 0.0; }
    return bitcast<f32>(e.w) * lora_b[e.y + n * e.z + j];
}

// The B product of row m (< p.m) for columns n: scale_m * h[m, :rank_m] . B_m[n, :].
fn lora_rows_delta(m: u32, n: vec4<u32>) -> vec4<f32> {
    let e = lora_entry(m);
    let h0 = m * p.lora_h_stride + p.lora_h;
    var d = vec4<f32>();
    for (var j = 0u; j < e.z; j++) {
        let b = vec4<f32>(lora_b[e.y + n.x * e.z + j], lora_b[e.y + n.y * e.z + j], lora_b[e.y + n.z * e.z + j],
            lora_b[e.y + n.w * e.z + j]);
        d += lora_h[h0 + j] * b;
    }
    return bitcast<f32>(e.w) * d;
}
