//! The workgroup memory a kernel declares, read from its source with naga (the compiler wgpu
//! uses).
//!
//! wgpu does not check a pipeline's workgroup memory against the device's
//! `max_compute_workgroup_storage_size`, and a driver given a shader past its limit may fail in
//! ways that name nothing (Vulkan leaves it undefined). The context measures each kernel here
//! before it compiles it and refuses one that does not fit, naming it; the kernel family table
//! (`gpu/family.rs`) picks families by the bytes their kernels declare, which
//! `tests/kernels.rs` checks against this measure for every kernel.

use crate::error::{Error, Result};

/// The bytes of workgroup memory (`var<workgroup>`) that the entry point of `source`, a kernel's
/// expanded WGSL, may take on any driver: Vulkan lets a driver lay the variables the entry
/// point uses out in any order, each at the next offset its alignment allows (std430), and
/// holds the limit to the largest such layout. Each variable's size rounded up to the largest
/// alignment among them bounds every order (each then starts on a multiple of every alignment),
/// and that sum is what this returns. Variables that the entry point never reaches (a
/// snippet's, unused) are not counted. `name` names the kernel in errors.
pub fn workgroup_bytes(name: &str, source: &str) -> Result<u32> {
    let bad = |what: String| Error::Gpu(format!("shader {name}: {what}"));
    let module = naga::front::wgsl::parse_str(source).map_err(|e| bad(e.emit_to_string(source)))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| bad(e.emit_to_string(source)))?;
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| bad(format!("workgroup memory layout: {e}")))?;
    if module.entry_points.len() != 1 {
        return Err(bad(format!("{} entry points; a kernel has one", module.entry_points.len())));
    }
    let used = info.get_entry_point(0);
    let layouts: Vec<_> = module
        .global_variables
        .iter()
        .filter(|(handle, var)| var.space == naga::AddressSpace::WorkGroup && !used[*handle].is_empty())
        .map(|(_, var)| layouter[var.ty])
        .collect();
    let Some(widest) = layouts.iter().map(|l| l.alignment).max() else { return Ok(0) };
    layouts.iter().try_fold(0u32, |bytes, l| {
        bytes.checked_add(widest.round_up(l.size)).ok_or_else(|| bad("workgroup memory past 4 GiB".to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_workgroup_variables_the_entry_point_reaches_at_their_layout() {
        let source = "
            struct Pair { a: vec3<f32>, b: f32 }
            var<workgroup> tile: array<array<f32, 33>, 16>;   // 2,112 bytes
            var<workgroup> flag: u32;                         // 4, taking 16 where pairs follow it
            var<workgroup> pairs: array<Pair, 3>;             // 3 x 16 at 16-byte alignment
            var<workgroup> unused: array<f32, 4096>;          // declared, never used
            var<private> regs: array<f32, 64>;                // not workgroup memory
            fn touch(i: u32) { pairs[i].b = 1.0; }
            @compute @workgroup_size(64)
            fn main(@builtin(local_invocation_index) i: u32) {
                tile[i % 16u][i % 33u] = regs[i];
                flag = i;
                touch(i % 3u);
            }";
        assert_eq!(workgroup_bytes("t", source).expect("measured"), 2112 + 4 + 12 + 48);
        // Alignments of at most 8: a vec2 and an f32, 12 bytes in one order and 16 in the other.
        let small = "var<workgroup> a: f32; var<workgroup> b: vec2<u32>;
            @compute @workgroup_size(1) fn main() { a = 1.0; b = vec2(1u); }";
        assert_eq!(workgroup_bytes("small", small).expect("measured"), 16);
        let none = "@compute @workgroup_size(1) fn main() {}";
        assert_eq!(workgroup_bytes("none", none).expect("measured"), 0);
        let broken = workgroup_bytes("broken", "fn main( {").expect_err("a parse error");
        assert!(broken.to_string().contains("shader broken"), "{broken}");
    }
}
