// Sampling without reading the logits back: the k largest of n values, largest first, in the
// total order of f32 that Rust's f32::total_cmp uses (a NaN without its sign bit above +inf),
// the lower index first among equal values, as the CPU sampler sorts them. Two dispatches:
//   pass 1 (final_pass = 0): workgroup g takes the elements g*chunk .. (g+1)*chunk and writes
//                             its k best to out[2k*g ..] as (key, index) pairs;
//   pass 2 (final_pass = 1): one workgroup takes the n pairs of pass 1 and writes the k best to
//                             out[0 .. 2k] as (value bits, index) pairs.
// Each is k rounds of a workgroup-wide maximum over the elements after the last one chosen;
// an index of NONE marks a missing element (fewer than k values). Grid row y does the same for
// row y of several (decoding several sequences): its n values of x, its pass-1 pairs and its k
// pairs out, each row's after the row before's.
struct TopKParams {
    n: u32,
    k: u32,
    final_pass: u32,
    chunk: u32,
}

@group(0) @binding(0) var<uniform> p: TopKParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;            // (n) f32 bits, or (n) pairs
@group(0) @binding(2) var<storage, read_write> out: array<u32>;    // (groups * k) or (k) pairs

const NONE: u32 = 0xffffffffu;

var<workgroup> best_k: array<u32, 256>;
var<workgroup> best_i: array<u32, 256>;
var<workgroup> last: vec2<u32>;

// A key whose unsigned order is the total order of the f32 with these bits.
fn key_of(bits: u32) -> u32 {
    return select(bits ^ 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

fn bits_of(key: u32) -> u32 {
    return select(~key, key ^ 0x80000000u, (key & 0x80000000u) != 0u);
}

// Whether (k, i) comes before (bk, bi): a larger key, or an equal one with a lower index.
fn before(k: u32, i: u32, bk: u32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || k > bk || (k == bk && i < bi));
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var start = 0u;
    var end = p.n;
    // Where this row's values (or pairs) start in x, and its pairs in out.
    var xo = wg.y * 2u * p.n;
    var oo = wg.y * 2u * p.k;
    if (p.final_pass == 0u) {
        start = wg.x * p.chunk;
        end = min(p.n, start + p.chunk);
        xo = wg.y * p.n;
        oo = wg.y * 2u * p.k * groups.x;
    }
    if (lid == 0u) { last = vec2<u32>(0u, NONE); }
    workgroupBarrier();
    for (var r = 0u; r < p.k; r++) {
        let lk = last.x;
        let li = last.y;
        var bk = 0u;
        var bi = NONE;
        for (var j = start + lid; j < end; j += 256u) {
            var k = 0u;
            var i = j;
            if (p.final_pass == 0u) {
                k = key_of(x[xo + j]);
            } else {
                k = x[xo + 2u * j];
                i = x[xo + 2u * j + 1u];
            }
            // Only what comes after the last one chosen (everything, in the first round).
            let after = li == NONE || k < lk || (k == lk && i > li);
            if (i != NONE && after && before(k, i, bk, bi)) { bk = k; bi = i; }
        }
        best_k[lid] = bk;
        best_i[lid] = bi;
        workgroupBarrier();
        for (var stride = 128u; stride > 0u; stride >>= 1u) {
            if (lid < stride && before(best_k[lid + stride], best_i[lid + stride], best_k[lid], best_i[lid])) {
                best_k[lid] = best_k[lid + stride];
                best_i[lid] = best_i[lid + stride];
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            let k = best_k[0];
            let i = best_i[0];
            if (p.final_pass == 0u) {
                out[oo + 2u * (wg.x * p.k + r)] = k;
                out[oo + 2u * (wg.x * p.k + r) + 1u] = i;
            } else {
                out[oo + 2u * r] = bits_of(k);
                out[oo + 2u * r + 1u] = i;
            }
            // Once nothing is left, every later round finds nothing too.
            if (i != NONE) { last = vec2<u32>(k, i); }
        }
        workgroupBarrier();
    }
}
