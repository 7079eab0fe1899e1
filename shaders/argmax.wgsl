// Greedy decoding without reading the logits back: the index of the largest of n values, the
// lowest index among equal maxima, NaN never chosen (and 0 when nothing beats -infinity), as
// `reference::argmax` and the CPU sampler pick. Two dispatches of this shader:
//   pass 1 (final_pass = 0): out[g] = the best (value bits, index) pair among the elements of
//                             workgroup g (i = g*256 + lid + j * n_groups*256);
//   pass 2 (final_pass = 1): one workgroup over the n pairs of pass 1; out[0] = the index.
// Grid row y does the same for row y of several (decoding several sequences): its n values
// from x[y * n], its pairs from out[y * 2 * n_groups] and its index into out[y].
struct ArgmaxParams {
    n: u32,
    final_pass: u32,
    n_groups: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: ArgmaxParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;            // (n) f32 bits, or (n) pairs
@group(0) @binding(2) var<storage, read_write> out: array<u32>;    // (n_groups) pairs, or (1)

const NONE: u32 = 0xffffffffu;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

// Whether (v, i) comes before (bv, bi): strictly larger, or equal with a lower index. NaN is
// larger than nothing, and no index beats NONE's value of -infinity unless it is larger.
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (v > bv || (v == bv && bi != NONE && i < bi));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var bv = bitcast<f32>(0xff800000u); // -infinity
    var bi = NONE;
    if (p.final_pass == 0u) {
        for (var i = wg.x * 256u + lid; i < p.n; i += p.n_groups * 256u) {
            let v = bitcast<f32>(x[wg.y * p.n + i]);
            if (v > bv) { bv = v; bi = i; }
        }
    } else {
        for (var j = lid; j < p.n; j += 256u) {
            let v = bitcast<f32>(x[2u * (wg.y * p.n + j)]);
            let i = x[2u * (wg.y * p.n + j) + 1u];
            if (better(v, i, bv, bi)) { bv = v; bi = i; }
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride && better(best_v[lid + stride], best_i[lid + stride], best_v[lid], best_i[lid])) {
            best_v[lid] = best_v[lid + stride];
            best_i[lid] = best_i[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (p.final_pass == 0u) {
            out[2u * (wg.y * p.n_groups + wg.x)] = bitcast<u32>(best_v[0]);
            out[2u * (wg.y * p.n_groups + wg.x) + 1u] = best_i[0];
        } else {
            out[wg.y] = select(best_i[0], 0u, best_i[0] == NONE);
        }
    }
}
