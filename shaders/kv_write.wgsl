// Writes a pass's new keys and values into a KV cache: row i of k and v (p.width floats each)
// goes to position p.first + i of k_cache and v_cache; with p.ranges = 1, to the position
// before the row's end in the key ranges of attention.wgsl's key_ends mode (decoding several
// sequences at once: each row's token is the last key it sees), and a row with no keys there
// (another pool's) is not written. One workgroup per row.
#include "common/params.wgsl"

@group(0) @binding(0) var<uniform> p: KvWriteParams;
@group(0) @binding(1) var<storage, read> k: array<f32>;              // (T, width)
@group(0) @binding(2) var<storage, read> v: array<f32>;              // (T, width)
@group(0) @binding(3) var<storage, read> ranges: array<u32>;         // (T, 2) with p.ranges
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;  // (positions, width)
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;  // (positions, width)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wg.x;
    if (i >= p.n_rows) { return; }
    var at = p.first + i;
    if (p.ranges != 0u) {
        if (ranges[2u * i] >= ranges[2u * i + 1u]) { return; }
        at = ranges[2u * i + 1u] - 1u;
    }
    for (var d = lid; d < p.width; d += 256u) {
        k_cache[at * p.width + d] = k[i * p.width + d];
        v_cache[at * p.width + d] = v[i * p.width + d];
    }
}
