// Where row i of a matrix of K columns gathered from up to three blocks of seg_rows rows starts
// in its flat buffer: the blocks start at firsts.x, firsts.y and firsts.z (the x A^T of the
// modules that read one input, q, k and v or gate and up, as one product; their dh A likewise).
fn gathered_row(i: u32, seg_rows: u32, firsts: vec3<u32>) -> u32 {
    let block = i / seg_rows;
    var first = firsts.x;
    if (block == 1u) { first = firsts.y; }
    if (block == 2u) { first = firsts.z; }
    return first + (i % seg_rows) * p.k;
}
