// The log-probabilities of a pair's two completions, from the per-row cross-entropies in `loss`
// (loss[t] = -log p(token t + 1), 0 on rows that score nothing): -sum over the chosen rows and
// -sum over the rejected rows, reduced across the workgroup's 64 threads. Needs `loss`,
// `spans` and the workgroup arrays `red_c`, `red_r` of 64 floats.
const SPAN: u32 = 6u; // chosen rows [0, 1), rejected rows [2, 3), scored tokens of each [4], [5]

fn pair_logps(pair: u32, lid: u32) -> vec2<f32> {
    let s = pair * SPAN;
    var c = 0.0;
    for (var t = spans[s] + lid; t < spans[s + 1u]; t += 64u) { c += loss[t]; }
    var r = 0.0;
    for (var t = spans[s + 2u] + lid; t < spans[s + 3u]; t += 64u) { r += loss[t]; }
    red_c[lid] = c;
    red_r[lid] = r;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red_c[lid] += red_c[lid + k];
            red_r[lid] += red_r[lid + k];
        }
        workgroupBarrier();
    }
    return vec2<f32>(-red_c[0], -red_r[0]);
}
