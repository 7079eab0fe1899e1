//! Every WGSL kernel against its CPU twin in `edgetune::reference`, on the adapter wgpu finds
//! (Mesa's lavapipe in CI). A missing adapter fails these tests: it is never a silent skip.

mod common;

use common::{assert_close, assert_close_slack, f16_products, f16_slack, gpu as ctx, gpus, rand, run};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::gpu::{launch, shaders};
use edgetune::quant::nf4;
use edgetune::reference as r;

/// On the binary's shared default context, so that the default family's tests find their
/// pipelines made.
#[test]
fn every_shader_compiles_on_the_adapter() {
    let ctx = gpus().swap_remove(0);
    eprintln!("{}", ctx.report);
    for s in shaders::ALL_SHADERS {
        if s.uses_subgroups() && !ctx.report.subgroups {
            continue; // only picked on adapters with subgroups (the simd8 family)
        }
        if s.uses_cooperative_matrix() && !ctx.report.cooperative_matrix {
            continue; // see the test below
        }
        // The constants without a default; those with one (ROWS_LORA) are left at it, as most
        // pipelines are (the gathered-LoRA test makes the others, in every family).
        let source = shaders::expand(s).expect("expand");
        let required: Vec<_> = shaders::overrides_in(&source)
            .iter()
            .filter(|o| !o.optional)
            .map(|o| (["BLOCK_SIZE"].into_iter().find(|n| *n == o.name).expect("a known constant"), 64))
            .collect();
        ctx.pipeline(s, &required).unwrap_or_else(|e| panic!("{}: {e}", s.name));
    }
}

/// The quantized kernels take their block size as a pipeline constant (`BLOCK_SIZE`), which
/// has no default, and the many-row forward kernels `ROWS_LORA`, which has one (off); no other
/// kernel declares one. A pipeline asked for without a constant its shader declares without a
/// default, or with one it does not declare, is an error naming the shader and both lists (a
/// quantized product compiled without its block size would otherwise be refused by wgpu with
/// a less helpful message, or, with a default value, read the wrong scales).
#[test]
fn a_pipeline_gets_exactly_the_pipeline_constants_its_shader_declares() {
    let ctx = ctx();
    let declaring = |optional: bool| -> Vec<&str> {
        shaders::ALL_SHADERS
            .iter()
            .filter(|s| {
                shaders::overrides_in(&shaders::expand(s).expect("expand")).iter().any(|o| o.optional == optional)
            })
            .map(|s| s.name)
            .collect()
    };
    let (quantized, rows) = (declaring(false), declaring(true));
    for name in ["matmul_nf4", "matvec_nf4.q4_1", "matmul_nf4_t128.q4_0", "matmul_nf4_backward_simd8"] {
        assert!(quantized.contains(&name), "{name} declares no block size: {quantized:?}");
    }
    assert!(quantized.iter().all(|n| n.starts_with("matmul_nf4") || n.starts_with("matvec_nf4")), "{quantized:?}");
    for name in ["matmul", "matmul_nf4_simd8.q4_1", "matmul_f16_t128.tile64", "matmul_nf4_t128.coop8.emulated"] {
        assert!(rows.contains(&name), "{name} declares no ROWS_LORA: {rows:?}");
    }
    let forward_only = |n: &&str| !n.contains("backward") && !n.contains("one_row") && !n.starts_with("matvec");
    assert!(rows.iter().all(|n| n.starts_with("matmul") && forward_only(n)), "{rows:?}");
    let missing = ctx.pipeline(&shaders::MATMUL_NF4, &[("ROWS_LORA", 1)]).expect_err("no block size");
    assert!(
        missing.to_string().contains(
            "matmul_nf4 declares the pipeline constants [\"BLOCK_SIZE\"] (and the optional [\"ROWS_LORA\"]) and was given [\"ROWS_LORA\"]"
        ),
        "{missing}"
    );
    let extra = ctx.pipeline(&shaders::MATMUL_BACKWARD, &[("BLOCK_SIZE", 64)]).expect_err("a dense matmul");
    assert!(
        extra.to_string().contains(
            "matmul_backward declares the pipeline constants [] (and the optional []) and was given [\"BLOCK_SIZE\"]"
        ),
        "{extra}"
    );
    let not_rows = ctx.pipeline(&shaders::MATVEC_NF4, &[("BLOCK_SIZE", 64), ("ROWS_LORA", 1)]).expect_err("one row");
    assert!(not_rows.to_string().contains("and was given [\"BLOCK_SIZE\", \"ROWS_LORA\"]"), "{not_rows}");
    for block in [32, 64, 128] {
        ctx.pipeline(&shaders::MATMUL_NF4, &[("BLOCK_SIZE", block)]).expect("a block size");
    }
    ctx.pipeline(&shaders::MATMUL, &[]).expect("ROWS_LORA off");
}

/// Every kernel binds no more storage buffers than WebGPU's default limit (8 a shader stage),
/// so each runs on any adapter that meets the defaults, however many operands fusions add
/// (the one-row NF4 products with a fused op and a LoRA B product bind 8).
#[test]
fn every_shader_binds_at_most_the_default_number_of_storage_buffers() {
    let limit = wgpu::Limits::default().max_storage_buffers_per_shader_stage as usize;
    let mut most = (0, "");
    for s in shaders::ALL_SHADERS {
        let storage = s.bindings().expect("bindings").iter().filter(|b| **b != shaders::Binding::Uniform).count();
        assert!(storage <= limit, "{} binds {storage} storage buffers, more than {limit}", s.name);
        most = most.max((storage, s.name));
    }
    eprintln!("the most storage buffers a kernel binds: {} ({})", most.0, most.1);
}

/// The kernel family table (`gpu/family.rs`) picks a family only where the adapter's workgroup
/// memory holds its kernels, by constants written out by hand; each is checked here against what
/// its kernels declare, measured by naga (`edgetune::gpu::workgroup_bytes`): every kernel fits
/// the bound of the family that runs it, and each family's bound is its largest kernel's, exact.
/// Every kernel outside the tiled and cooperative-matrix families fits 16 KiB (Vulkan's minimum,
/// WebGPU's default), so those run on any adapter.
#[test]
fn every_kernel_fits_the_workgroup_memory_its_family_is_picked_for() {
    use edgetune::gpu::family as f;
    let bound = |name: &str| -> (&str, u32) {
        let base = name.split('.').next().unwrap_or(name);
        if name.contains(".coop16") {
            ("coop16", f::COOP16_WORKGROUP_BYTES)
        } else if name.contains(".coop8") {
            ("coop8", f::COOP8_WORKGROUP_BYTES)
        } else if name.contains(".half") {
            ("half", f::HALF_WORKGROUP_BYTES)
        } else if name.contains(".tile64") {
            ("tile64", f::TILE64_WORKGROUP_BYTES)
        } else if name.contains(".narrow") {
            ("narrow", f::NARROW_WORKGROUP_BYTES)
        } else if base.starts_with("attention") && base.ends_with("_t128") {
            ("tile128 attention", f::ATTENTION_T128_WORKGROUP_BYTES)
        } else if base.ends_with("_t128") {
            ("tile128", f::TILE128_WORKGROUP_BYTES)
        } else {
            ("any adapter", f::PORTABLE_WORKGROUP_BYTES)
        }
    };
    let mut largest: std::collections::BTreeMap<&str, (u32, &str)> = Default::default();
    for s in shaders::ALL_SHADERS {
        let bytes = edgetune::gpu::workgroup_bytes(s.name, &shaders::expand(s).expect("expand"))
            .unwrap_or_else(|e| panic!("{e}"));
        let (class, most) = bound(s.name);
        assert!(bytes <= most, "{} uses {bytes} bytes of workgroup memory; {class} kernels may use {most}", s.name);
        let entry = largest.entry(class).or_insert((0, ""));
        *entry = (*entry).max((bytes, s.name));
    }
    eprintln!("the largest kernel of each class: {largest:?}");
    for class in ["coop16", "coop8", "half", "tile64", "narrow", "tile128 attention", "tile128"] {
        let name = largest.get(class).map_or("", |l| l.1);
        let (_, constant) = bound(name);
        assert_eq!(largest.get(class).map(|l| l.0), Some(constant), "{class}: the table's bytes against {name}'s");
    }
}

/// The context drops wgpu's loop counters from the kernels (`ShaderChecks::Bounds`, the
/// default), which wgpu allows only for kernels whose every loop ends: a driver may treat an
/// endless loop as unreachable. So every loop of every kernel has one of a few forms that end
/// by their shape: `for (var v = ...; v < B (or <=, or && more); v++ or v += S)` with a step S
/// of at least 1 (a positive literal or constant, or one of the named expressions below, each
/// at least 1), `for (var v = ...; v > 0u; v >>= 1u)`, or `v <<= 1u` up to a bound of at
/// most 2^31; no `loop` or `while`; and the loop's body never assigns v or takes its address.
/// (Counting up cannot wrap past 2^32: every bound is a size or a position of a buffer that one
/// binding sees.)
#[test]
fn every_kernel_loop_counts_up_or_down_to_a_bound_by_a_fixed_step() {
    // Steps that are not constants, and why each is at least 1.
    let named_steps = [
        // min(the subgroup's size, 16): a subgroup has at least the invocation that counts it.
        "lanes",
        // The grid's own workgroup count: a kernel that runs has at least one workgroup.
        "p.n_groups * 256u",
    ];
    // Bounds of doubling loops, and why each is at most 2^31.
    let doubling_bounds = ["lanes"]; // at most 16
    let mut loops = 0;
    for s in shaders::ALL_SHADERS {
        let source = shaders::expand(s).expect("expand");
        let code: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let words = |w: &str| code.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|x| x == w);
        assert!(!words("loop") && !words("while"), "{}: a `loop` or `while`; write a bounded `for`", s.name);
        let constant = |name: &str| -> Option<u64> {
            let decl = code.split(&format!("const {name}: u32 = ")).nth(1)?;
            decl.split(';').next()?.trim().trim_end_matches('u').parse().ok()
        };
        let mut rest = code.as_str();
        while let Some(at) = rest.find("for (") {
            loops += 1;
            let after = &rest[at + 5..];
            let header_end = after.find(") {").unwrap_or_else(|| panic!("{}: a `for` without `) {{`", s.name));
            let header = &after[..header_end];
            let parts: Vec<&str> = header.split(';').map(str::trim).collect();
            let fail = |why: &str| panic!("{}: `for ({header})`: {why}", s.name);
            if parts.len() != 3 {
                fail("not `init; condition; update`");
            }
            let v = parts[0].strip_prefix("var ").and_then(|d| d.split('=').next()).map(str::trim);
            let Some(v) = v.filter(|v| !v.is_empty()) else { fail("the loop's variable is not declared in it") };
            let (cond, update) = (parts[1], parts[2]);
            let bound =
                cond.strip_prefix(v).map(str::trim).unwrap_or_else(|| fail("the condition does not start with it"));
            if update == format!("{v}++") || update.starts_with(&format!("{v} += ")) {
                if !(bound.starts_with("< ") || bound.starts_with("<= ")) {
                    fail("counts up to no `<` or `<=` bound");
                }
                let step = update.strip_prefix(&format!("{v} += ")).unwrap_or("1u");
                let literal = step.trim_end_matches('u').parse::<u64>().ok();
                let fixed = literal.or_else(|| constant(step));
                if !(fixed.is_some_and(|n| n >= 1) || named_steps.contains(&step)) {
                    fail("a step that is neither a positive constant nor a step known to be at least 1");
                }
            } else if update == format!("{v} >>= 1u") {
                if bound != "> 0u" {
                    fail("halves down to no `> 0u` bound");
                }
            } else if update == format!("{v} <<= 1u") {
                let b = bound.strip_prefix("< ").unwrap_or_else(|| fail("doubles up to no `<` bound"));
                if !doubling_bounds.contains(&b) {
                    fail("doubles up to a bound not known to be at most 2^31");
                }
            } else {
                fail("an update other than ++, += S, >>= 1u or <<= 1u");
            }
            // The body, to its matching brace, never assigns the loop's variable.
            let body_start = header_end + 3;
            let mut depth = 1;
            let mut end = body_start;
            for (i, c) in after[body_start..].char_indices() {
                depth += match c {
                    '{' => 1,
                    '}' => -1,
                    _ => 0,
                };
                if depth == 0 {
                    end = body_start + i;
                    break;
                }
            }
            let body = &after[body_start..end];
            let assigned = body.match_indices(v).any(|(i, _)| {
                let before = body[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
                let next = body[i + v.len()..].trim_start();
                let op = ["=", "+=", "-=", "*=", "/=", "%=", "<<=", ">>=", "&=", "|=", "^=", "++", "--"]
                    .iter()
                    .any(|o| next.starts_with(o) && !next.starts_with("=="));
                !before && body[i + v.len()..].chars().next().is_some_and(|c| !(c.is_alphanumeric() || c == '_')) && op
            });
            let pointed = body.match_indices(&format!("&{v}")).any(|(i, _)| {
                body[i + 1 + v.len()..].chars().next().is_some_and(|c| !(c.is_alphanumeric() || c == '_'))
            });
            if assigned || pointed {
                fail("the body assigns the loop's variable, or passes a pointer to it");
            }
            rest = &after[header_end..];
        }
    }
    eprintln!("{loops} loops checked over {} kernels", shaders::ALL_SHADERS.len());
    assert!(loops > 100, "only {loops} loops found: the search for `for (` is broken");
}

/// Each setting of the checks wgpu adds to the kernels (`GpuOptions::shader_checks`) opens a
/// device that says so and runs tile128's NF4 product and blocked attention (loops over
/// reduction steps, key tiles and subgroup lanes) as their CPU twins compute them; the default
/// drops only the loop counters.
#[test]
fn every_shader_checks_setting_runs_the_loop_heavy_kernels_as_their_twins() {
    use edgetune::gpu::{KernelFamily, ShaderChecks};
    assert_eq!(ctx().report.shader_checks, ShaderChecks::Bounds, "the default");
    for checks in ShaderChecks::ALL {
        let opts =
            GpuOptions { kernels: Some(KernelFamily::Tile128), shader_checks: Some(checks), ..Default::default() };
        let ctx = GpuContext::new(&opts).unwrap_or_else(|e| panic!("{checks}: {e}"));
        assert_eq!(ctx.report.shader_checks, checks);
        assert!(ctx.report.to_string().contains(&format!("shader checks: {checks}\n")), "{}", ctx.report);
        let (m, n, k, bs) = (130, 67, 200, 32);
        let x = rand(m * k, 41, 1.0);
        let w = rand(n * k, 42, 0.3);
        let q = nf4::quantize(&w, &[n, k], bs).expect("quantize");
        let wd = q.dequantize();
        let want = r::matmul_forward(&x, &wd, None, m, n, k);
        let (xb, pb, ab) =
            (ctx.storage_from("x", &x), ctx.storage_from("packed", &q.packed), ctx.storage_from("absmax", &q.absmax));
        let w = launch::Weight::Nf4 { packed: &pb, absmax: &ab, block_size: bs };
        check_matmul(&ctx, &format!("matmul_nf4 with checks {checks}"), (&xb, w), (&x, &wd), None, &want, (m, n, k));
        let (t, case) =
            (70, r::AttentionCase { n_heads: 4, n_kv_heads: 2, head_dim: 72, pos_offset: 3, softcap: None });
        let (qv, kv, vv) =
            (rand(t * 4 * 72, 43, 1.0), rand((t + 3) * 2 * 72, 44, 1.0), rand((t + 3) * 2 * 72, 45, 1.0));
        let want = r::attention_forward(&qv, &kv, &vv, &vec![0; t], case);
        let got = gpu_attention(&ctx, [&qv, &kv, &vv], &vec![0; t], case);
        assert_close(&format!("attention with checks {checks}"), &got.out, &want, 1e-4, 1e-5);
    }
}

/// wgpu does not hold a kernel to the device's workgroup memory (a driver given one past it
/// may fail in ways that name nothing), so the context does: on a device opened with 16 KiB, a
/// kernel that needs more is refused before it is compiled, naming it, its bytes and the
/// limit, and its 64 x 64 variant compiles.
#[test]
fn a_kernel_past_the_devices_workgroup_memory_is_refused_naming_it() {
    let ctx = common::small_workgroup_gpu();
    for (s, bytes) in [(&shaders::MATMUL_T128, 16960), (&shaders::ATTENTION_T128, 25616)] {
        let err = ctx.pipeline(s, &[]).expect_err("past 16 KiB").to_string();
        let want = format!("shader {} uses {bytes} bytes of workgroup memory and this device allows 16384", s.name);
        assert!(err.contains(&want), "{err}");
    }
    ctx.pipeline(&shaders::MATMUL_T64, &[]).expect("tile64 fits");
}

/// A kernel's expanded source parsed and validated by naga, the compiler wgpu uses, with its
/// pipeline constants resolved as wgpu resolves them before it hands a module to a back end
/// (the quantized kernels' block size: 64).
fn resolved(name: &str, source: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module =
        naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    let mut constants = naga::back::PipelineConstants::default();
    for constant in shaders::overrides_in(source).iter().filter(|o| !o.optional) {
        constants.insert(constant.name.to_string(), 64.0);
    }
    let (module, info) = naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
        .unwrap_or_else(|e| panic!("{name}: pipeline constants: {e}"));
    (module.into_owned(), info.into_owned())
}

/// The cooperative-matrix kernels need matrix units, which lavapipe does not have, so no test
/// here can run them (the start-up self-test runs them on a GPU that has them, before they are
/// used). What can be checked without one is checked: each parses, validates with the
/// capability and translates with naga, the compiler wgpu uses, to SPIR-V (Vulkan), and coop8's
/// also to the Metal shading language (Apple GPUs, the ones that list its 8 x 8 f32
/// configuration); and each declares the same bindings as the tile128 kernel it stands in for.
#[test]
fn cooperative_matrix_kernels_validate_and_translate_to_spirv_and_msl() {
    let coop: Vec<_> = shaders::ALL_SHADERS.iter().filter(|s| s.uses_cooperative_matrix()).collect();
    let names = |family: &str| coop.iter().filter(|s| s.name.contains(family)).count();
    // coop16: dense, f16, NF4, Q4_0 and Q4_1 forward kernels; f16, NF4, Q4_0 and Q4_1 input
    // gradients. coop8: those, the dense input gradient and the weight gradient.
    assert_eq!(
        (names(".coop16"), names(".coop8"), coop.len()),
        (9, 11, 20),
        "the cooperative-matrix kernels: {:?}",
        coop.iter().map(|s| s.name).collect::<Vec<_>>()
    );
    for s in coop {
        let source = shaders::expand(s).expect("expand");
        let coop8 = s.name.contains(".coop8");
        // The variant swaps the core: the matrix-unit one in, the tile128 one out.
        assert!(
            source.contains("coopMultiplyAdd") && !source.contains("acc0[0]"),
            "{}: the core was not swapped",
            s.name
        );
        let enables =
            if coop8 { "enable wgpu_cooperative_matrix;\n" } else { "enable f16;\nenable wgpu_cooperative_matrix;\n" };
        assert!(source.starts_with(enables), "{}: enables not hoisted", s.name);
        let (module, info) = resolved(s.name, &source);
        let (module, info) = (&module, &info);
        let words = naga::back::spv::write_vec(module, info, &naga::back::spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{}: SPIR-V: {e}", s.name));
        assert!(words.len() > 100, "{}: {} SPIR-V words", s.name, words.len());
        if coop8 {
            // Metal 2.3 is the first with simdgroup matrices (wgpu lists them only from there).
            let options = naga::back::msl::Options { lang_version: (2, 3), ..Default::default() };
            let pipeline = naga::back::msl::PipelineOptions::default();
            let (msl, _) = naga::back::msl::write_string(module, info, &options, &pipeline)
                .unwrap_or_else(|e| panic!("{}: MSL: {e}", s.name));
            for want in ["simdgroup_float8x8", "simdgroup_multiply_accumulate", "simdgroup_load", "simdgroup_store"] {
                assert!(msl.contains(want), "{}: no {want} in its MSL", s.name);
            }
        }
        let base = s.name.split('.').next().expect("a name");
        let twin = shaders::ALL_SHADERS.iter().find(|t| t.name == base).expect("tile128 twin");
        assert_eq!(s.bindings().expect("bindings"), twin.bindings().expect("bindings"), "{}", s.name);
    }
}

/// Lavapipe runs every kernel through naga's SPIR-V back end only; Apple GPUs get them through
/// its Metal back end and Windows through its HLSL one (DX12), which no test here can run. So
/// each kernel but the cooperative-matrix ones (above) is translated to both as wgpu would
/// translate it, its pipeline constants resolved first (MSL 2.3, HLSL shader model 6.2): a
/// construct that naga validates and writes as SPIR-V but that one of those back ends refuses
/// would fail pipeline creation on that platform, and fails here.
#[test]
fn every_kernel_translates_to_metal_and_hlsl() {
    let mut count = 0;
    for s in shaders::ALL_SHADERS.iter().filter(|s| !s.uses_cooperative_matrix()) {
        let source = shaders::expand(s).expect("expand");
        let (module, info) = resolved(s.name, &source);
        let (module, info) = (&module, &info);
        let options = naga::back::msl::Options { lang_version: (2, 3), ..Default::default() };
        let (msl, _) =
            naga::back::msl::write_string(module, info, &options, &naga::back::msl::PipelineOptions::default())
                .unwrap_or_else(|e| panic!("{}: MSL: {e}", s.name));
        assert!(msl.contains("kernel void"), "{}: no kernel in its MSL", s.name);
        let options =
            naga::back::hlsl::Options { shader_model: naga::back::hlsl::ShaderModel::V6_2, ..Default::default() };
        let mut hlsl = String::new();
        naga::back::hlsl::Writer::new(&mut hlsl, &options, &naga::back::hlsl::PipelineOptions::default())
            .write(module, info, None)
            .unwrap_or_else(|e| panic!("{}: HLSL: {e}", s.name));
        assert!(hlsl.contains("[numthreads("), "{}: no compute entry point in its HLSL", s.name);
        count += 1;
    }
    eprintln!("{count} kernels translated to MSL and HLSL");
    assert!(count > 100, "only {count} kernels");
}

/// wgpu has no memory API: it is read from the backend under it (Vulkan's heaps, Metal's working
/// set, DXGI's budget), and an unknown size must read as `None`, never as 0.
#[test]
fn the_gpu_memory_comes_from_the_backend() {
    let ctx = ctx();
    let at_open = ctx.report.memory;
    if !["Vulkan", "Metal", "Dx12"].contains(&ctx.report.backend.as_str()) {
        assert_eq!(at_open, None, "{} reports no memory", ctx.report.backend);
        return;
    }
    let m = at_open.expect("Vulkan, Metal and DX12 report the GPU's memory");
    assert!(m.total_bytes >= 64 << 20, "a heap of {} bytes is too small to be real", m.total_bytes);
    let now = ctx.memory().expect("read again");
    assert_eq!(now.total_bytes, m.total_bytes, "the heap does not change size");
    assert_eq!(now.available_bytes.is_some(), m.available_bytes.is_some(), "a budget is there or not");
    if let Some(free) = now.available_bytes {
        assert!(free <= m.total_bytes, "free {free} exceeds the heap {}", m.total_bytes);
    }
}

/// Records `times` dense forward products y (=/+=) x W^T of shape (m, n, k).
fn dense_matmuls(
    ctx: &GpuContext,
    enc: &mut edgetune::gpu::Encoder,
    (x, w, y): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    (m, n, k): (usize, usize, usize),
    out: launch::OutCols,
    times: usize,
) -> edgetune::Result<()> {
    for _ in 0..times {
        let w = launch::Weight::Dense(w);
        launch::matmul_forward(ctx, enc, launch::Matmul { x, w, bias: None, y, m, n, k, out })?;
    }
    Ok(())
}

/// A forward product on the GPU against `want`, its twin on the host operands `hosts` (x and
/// the weight as the kernel reads it), within the f16 bound where coop16 runs it.
fn check_matmul(
    ctx: &GpuContext,
    label: &str,
    (x, w): (&wgpu::Buffer, launch::Weight<'_>),
    hosts: (&[f32], &[f32]),
    bias: Option<&wgpu::Buffer>,
    want: &[f32],
    (m, n, k): (usize, usize, usize),
) {
    let y = ctx.storage_zeroed("y", m * n);
    run(ctx, |enc| {
        launch::matmul_forward(ctx, enc, launch::Matmul { x, w, bias, y: &y, m, n, k, out: launch::OutCols::whole(n) })
    });
    let got = ctx.read_f32(&y, m * n).expect("readback");
    let slack = f16_slack(f16_products(ctx), (m, n, k), 1.0, |r, j| hosts.0[r * k + j], |c, j| hosts.1[c * k + j]);
    assert_close_slack(&format!("{label} {m}x{n}x{k}"), &got, want, 1e-5, 1e-5 * (k as f32).sqrt(), &slack);
}

#[test]
fn matmul_dense_matches_reference_on_odd_shapes() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k)) in [
            (1, 1, 1),
            (3, 65, 70),
            (5, 130, 64),
            (17, 7, 129),
            (4, 64, 64),
            (70, 67, 100),
            (129, 3, 17),
            (70, 67, 96),
            (1, 45, 200),
        ]
        .iter()
        .enumerate()
        {
            let x = rand(m * k, 1 + i as u64, 1.0);
            let w = rand(n * k, 100 + i as u64, 0.5);
            let b = rand(n, 200 + i as u64, 0.5);
            let want = r::matmul_forward(&x, &w, Some(&b), m, n, k);
            let (xb, wb, bb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &w), ctx.storage_from("b", &b));
            let operands = (&xb, launch::Weight::Dense(&wb));
            check_matmul(&ctx, "matmul", operands, (&x, &w), Some(&bb), &want, (m, n, k));
        }
    }
}

/// A many-row product reading a block of columns of a wider x and gathering its dense
/// weight's rows from blocks out of order (`launch::matmul_shared_forward`: the x A^T of q, k
/// and v as one product, and each B product reading its module's columns of h), scaled and
/// added to what y holds, in every family against the twin on the contiguous operands. Strides
/// and first columns that are multiples of 4 (which simd8 reads as vec4s) and ones that are
/// not; blocks that do not fit are refused.
#[test]
fn many_row_products_read_a_block_of_x_and_gather_weight_rows() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (rows m, weight rows a block, outputs n, reduction k, x's row stride, first column)
        let cases = [
            (2, 1, 3, 8, 8, 0),
            (3, 5, 14, 70, 75, 3),
            (70, 16, 48, 200, 208, 8),
            (129, 8, 17, 64, 68, 4),
            (33, 16, 32, 48, 144, 96),
        ];
        for (i, &(m, per, n, k, stride, col)) in cases.iter().enumerate() {
            let seed = 500 + 10 * i as u64;
            let x = rand(m * k, seed, 1.0);
            let w = rand(n * k, seed + 1, 0.5);
            // x's rows inside a wider matrix, the rest of which must not be read.
            let mut wide = rand(m * stride, seed + 2, 100.0);
            for r in 0..m {
                wide[r * stride + col..][..k].copy_from_slice(&x[r * k..][..k]);
            }
            // The weight's blocks of `per` rows in the order 2, 0, 1 after 5 other values.
            let starts = [5 + per * k, 5 + 2 * per * k, 5];
            let mut blocks = rand(5 + 3 * per * k, seed + 3, 100.0);
            for j in 0..n {
                let at = starts[j / per] + (j % per) * k;
                blocks[at..at + k].copy_from_slice(&w[j * k..(j + 1) * k]);
            }
            let y0 = rand(m * n, seed + 4, 1.0);
            let (alpha, product) = (1.5f32, r::matmul_forward(&x, &w, None, m, n, k));
            let want: Vec<f32> = y0.iter().zip(&product).map(|(y, p)| y + alpha * p).collect();
            let (xb, wb, yb) =
                (ctx.storage_from("x", &wide), ctx.storage_from("blocks", &blocks), ctx.storage_from("y", &y0));
            let mm = launch::Matmul {
                x: &xb,
                w: launch::Weight::DenseAt(&wb, starts[0]),
                bias: None,
                y: &yb,
                m,
                n,
                k,
                out: launch::OutCols::whole(n).scaled(alpha).accumulated(),
            };
            let shared = launch::Shared {
                x_cols: Some((stride, col)),
                gather: Some(launch::Gather { rows: per, offsets: [starts[1], starts[2]] }),
            };
            run(&ctx, |enc| launch::matmul_shared_forward(&ctx, enc, mm, shared));
            let got = ctx.read_f32(&yb, m * n).expect("readback");
            let slack = f16_slack(f16_products(&ctx), (m, n, k), alpha, |r, j| x[r * k + j], |c, j| w[c * k + j]);
            let what = format!("{} shared product {m}x{n}x{k}, x {stride} wide from {col}", ctx.report.kernels.matmul);
            assert_close_slack(&what, &got, &want, 1e-5, 1e-5 * (k as f32).sqrt(), &slack);
            // What does not fit is refused before anything is recorded.
            let mut enc = ctx.encoder();
            let past = launch::Shared { x_cols: Some((stride, stride - k + 1)), gather: None };
            let plain = launch::Matmul { w: launch::Weight::DenseAt(&wb, 0), ..mm };
            let err = launch::matmul_shared_forward(&ctx, &mut enc, plain, past).expect_err("past its row");
            assert!(err.to_string().contains("do not fit x"), "{err}");
            let few = launch::Shared {
                x_cols: None,
                gather: Some(launch::Gather { rows: n.div_ceil(3) - 1, offsets: [0, 0] }),
            };
            let err = launch::matmul_shared_forward(&ctx, &mut enc, mm, few).expect_err("too few rows a block");
            assert!(err.to_string().contains("do not fit"), "{err}");
            let one = launch::Matmul { m: 1, ..mm };
            let err = launch::matmul_shared_forward(&ctx, &mut enc, one, shared).expect_err("one row");
            assert!(err.to_string().contains("one row"), "{err}");
        }
    }
}

/// down_proj's LoRA A gradient reads its input act(gate) * up through the op as it loads the
/// gate (`WeightGradCols::x_input`), so that the backward pass writes no gated rows: in every
/// family, SwiGLU's and GeGLU's gates, on shapes that divide no tile (reductions over 2 to 129
/// tokens, K of 8 to 576, aligned for simd8's vec4s or not), scaled and added at an offset,
/// against the twins run one after the other (`silu_mul_forward` or `gelu_mul_forward`, then
/// `matmul_backward_w`). The bound (u = 2^-24), as the one-row test's: (2M + 16) u alpha
/// sum_m |dy_mj a_mk| for the sums and the activation's roundings, 32 u alpha sum_m |dy_mj g_mk
/// up_mk| for the GPU's exp and tanh, 4u of the ends. A norm, or an up projection shorter than
/// the gate's rows, is refused.
#[test]
fn a_weight_gradient_reads_the_gated_activation_through_the_op() {
    let u = 2f64.powi(-24);
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k)) in [(2, 5, 8), (3, 37, 70), (70, 48, 200), (129, 16, 96), (40, 16, 576)].iter().enumerate()
        {
            let seed = 900 + 10 * i as u64;
            let (gate, up) = (rand(m * k, seed, 4.0), rand(m * k, seed + 1, 2.0));
            let (gateb, upb) = (ctx.storage_from("gate", &gate), ctx.storage_from("up", &up));
            let gate_up: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| f64::from((g * u).abs())).collect();
            let ops = [
                ("silu", launch::RowInput::SiluMul { up: &upb }, r::silu_mul_forward(&gate, &up)),
                ("gelu", launch::RowInput::GeluMul { up: &upb }, r::gelu_mul_forward(&gate, &up)),
            ];
            // dw (n, k) at element 5, += 0.5 dy^T act.
            let dy = rand(m * n, seed + 5, 1.0);
            let dyb = ctx.storage_from("dy", &dy);
            for (op, input, act) in &ops {
                let dw0 = rand(5 + n * k, seed + 6, 1.0);
                let dwb = ctx.storage_from("dw", &dw0);
                let g = launch::WeightGrad {
                    dy: &dyb,
                    x: &gateb,
                    dw: &dwb,
                    dw_offset: 5,
                    m,
                    n,
                    k,
                    alpha: 0.5,
                    accumulate: true,
                };
                let cols = launch::WeightGradCols { x_input: Some(*input), ..Default::default() };
                run(&ctx, |enc| launch::matmul_backward_w_cols(&ctx, enc, g, cols));
                let want: Vec<f32> =
                    dw0[5..].iter().zip(r::matmul_backward_w(&dy, act, m, n, k)).map(|(a, b)| a + 0.5 * b).collect();
                let slack: Vec<f32> = (0..n * k)
                    .map(|o| {
                        let (j, c) = (o / k, o % k);
                        let sum = |v: &dyn Fn(usize) -> f64| -> f64 {
                            (0..m).map(|r| f64::from(dy[r * n + j].abs()) * v(r * k + c)).sum()
                        };
                        let products = (2 * m + 16) as f64 * u * sum(&|e| f64::from(act[e].abs()));
                        let gates = 32.0 * u * sum(&|e| gate_up[e]);
                        let ends = 4.0 * u * f64::from(dw0[5 + o].abs() + want[o].abs());
                        ((products + gates) * 0.5 + ends) as f32
                    })
                    .collect();
                let what = format!("{} dW through the {op} gate {m}x{n}x{k}", ctx.report.kernels.matmul_grad);
                assert_dw_at(&ctx, &what, (&dwb, &dw0, 5), &want, &slack);
            }
            // A norm is not read through, and up must cover the gate's rows: a row short
            // (storage is padded to a few values, never a row of 8 or more).
            let mut enc = ctx.encoder();
            let dwb = ctx.storage_zeroed("dw", n * k);
            let g = launch::WeightGrad {
                dy: &dyb,
                x: &gateb,
                dw: &dwb,
                dw_offset: 0,
                m,
                n,
                k,
                alpha: 1.0,
                accumulate: false,
            };
            let short = ctx.storage_from("short up", &up[..(m - 1) * k]);
            for (input, says) in [
                (launch::RowInput::RmsNorm { w: &upb, eps: 1e-6 }, "kept 1 / rms"),
                (launch::RowInput::GeluMul { up: &short }, "fewer than"),
            ] {
                let cols = launch::WeightGradCols { x_input: Some(input), ..Default::default() };
                let err = launch::matmul_backward_w_cols(&ctx, &mut enc, g, cols).expect_err("refused");
                assert!(err.to_string().contains(says), "{err}");
            }
        }
    }
}

/// A weight gradient added at element `at` of a buffer that held `before`: its values within
/// `slack` of `want`, and nothing before `at` written.
fn assert_dw_at(
    ctx: &GpuContext,
    what: &str,
    (dw, before, at): (&wgpu::Buffer, &[f32], usize),
    want: &[f32],
    slack: &[f32],
) {
    let got = ctx.read_f32(dw, at + want.len()).expect("readback");
    assert_close_slack(what, &got[at..], want, 0.0, 0.0, slack);
    assert_eq!(got[..at], before[..at], "{what}: wrote before its offset");
}

/// A weight gradient reading the normed rows through the norm (`RowInput::RmsNormKept`): x the
/// norm's input, the norm's weight w and each row's 1 / rms as `rms_norm_forward_keeping` keeps
/// it, read as w[k] * (x[m, k] * inv_rms[m]), which is how the norm writes its rows (and the
/// twin `r::rms_norm_forward` computes them), so the only error is the dot product's: the
/// bound (2M + 16) u sum |dy xn| as for the plain weight gradient, and the ends' rounding. Every
/// family, unaligned and aligned shapes, dy read as a block of columns of a wider dh as
/// training reads it; the kept 1 / rms, and refusals of what does not fit.
#[test]
fn a_weight_gradient_reads_the_normed_rows_through_the_norm_with_its_kept_inverse_rms() {
    let u = 2f64.powi(-24);
    let eps = 1e-5f32;
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k, (stride, col))) in [
            (2, 5, 8, (5, 0)),
            (3, 37, 70, (40, 3)),
            (70, 16, 200, (48, 16)),
            (129, 16, 96, (16, 0)),
            (40, 8, 576, (24, 8)),
        ]
        .iter()
        .enumerate()
        {
            let seed = 1300 + 10 * i as u64;
            let (x, w) = (rand(m * k, seed, 3.0), rand(k, seed + 1, 1.5));
            let inv: Vec<f32> =
                x.chunks(k).map(|row| 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / k as f32 + eps).sqrt()).collect();
            let (xb, wb, invb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &w), ctx.storage_from("inv", &inv));
            // The norm keeps what the loader reads: its rows as before, and each row's 1 / rms
            // within the rounding of the sum of squares and of inverseSqrt.
            let (yb, kept) = (ctx.storage_zeroed("y", m * k), ctx.storage_zeroed("kept", m));
            let norm = launch::RmsNorm { x: &xb, w: &wb, y: &yb, n_rows: m, dim: k, eps };
            run(&ctx, |enc| launch::rms_norm_forward_keeping(&ctx, enc, norm, &kept));
            let xn = r::rms_norm_forward(&x, &w, eps);
            let what = format!("rms_norm.keep {m}x{k}");
            assert_close(&what, &ctx.read_f32(&yb, m * k).expect("read"), &xn, 1e-5, 1e-6);
            let slack: Vec<f32> = inv.iter().map(|v| ((k as f64 / 2.0 + 6.0) * u * f64::from(*v)) as f32).collect();
            assert_close_slack(&what, &ctx.read_f32(&kept, m).expect("read"), &inv, 0.0, 0.0, &slack);

            // dw (n, k) at element 3, += 0.5 dy^T xn, dy the columns [col, col + n) of rows of
            // `stride`.
            let dy = rand(m * n, seed + 2, 1.0);
            let mut wide = rand(m * stride, seed + 3, 50.0);
            for r in 0..m {
                wide[r * stride + col..][..n].copy_from_slice(&dy[r * n..][..n]);
            }
            let dyb = ctx.storage_from("dy", &wide);
            let dw0 = rand(3 + n * k, seed + 4, 1.0);
            let dwb = ctx.storage_from("dw", &dw0);
            let g =
                launch::WeightGrad { dy: &dyb, x: &xb, dw: &dwb, dw_offset: 3, m, n, k, alpha: 0.5, accumulate: true };
            let through = launch::RowInput::RmsNormKept { w: &wb, inv_rms: &invb };
            let cols = launch::WeightGradCols { dy: Some((stride, col)), x_input: Some(through), ..Default::default() };
            run(&ctx, |enc| launch::matmul_backward_w_cols(&ctx, enc, g, cols));
            let want: Vec<f32> =
                dw0[3..].iter().zip(r::matmul_backward_w(&dy, &xn, m, n, k)).map(|(a, b)| a + 0.5 * b).collect();
            let slack: Vec<f32> = (0..n * k)
                .map(|o| {
                    let (j, c) = (o / k, o % k);
                    let sum: f64 = (0..m).map(|r| f64::from((dy[r * n + j] * xn[r * k + c]).abs())).sum();
                    let ends = 4.0 * u * f64::from(dw0[3 + o].abs() + want[o].abs());
                    ((2 * m + 16) as f64 * u * sum * 0.5 + ends) as f32
                })
                .collect();
            let what = format!("{} dW through the kept norm {m}x{n}x{k}", ctx.report.kernels.matmul_grad);
            assert_dw_at(&ctx, &what, (&dwb, &dw0, 3), &want, &slack);

            // A weight short of a row, or four rows more than the 1 / rms holds (storage is
            // padded to whole vec4s), are refused, and so is a one-row product through a kept
            // norm (it norms its row itself).
            let mut enc = ctx.encoder();
            let short_w = ctx.storage_from("short w", &w[..k - 4]);
            for (input, rows, says) in [
                (launch::RowInput::RmsNormKept { w: &short_w, inv_rms: &invb }, m, "weight holds fewer"),
                (through, m + 4, "1 / rms holds fewer"),
            ] {
                let cols = launch::WeightGradCols { x_input: Some(input), ..Default::default() };
                let g = launch::WeightGrad { m: rows, ..g };
                let err = launch::matmul_backward_w_cols(&ctx, &mut enc, g, cols).expect_err("refused");
                assert!(err.to_string().contains(says), "{err}");
            }
            let more = launch::RmsNorm { n_rows: m + 4, ..norm };
            let err = launch::rms_norm_forward_keeping(&ctx, &mut enc, more, &invb).expect_err("refused");
            assert!(err.to_string().contains("fewer than"), "{err}");
            let one = launch::Matmul {
                x: &xb,
                w: launch::Weight::Dense(&dwb),
                bias: None,
                y: &yb,
                m: 1,
                n: 1,
                k,
                out: launch::OutCols::whole(1),
            };
            let fused = launch::Fused { input: Some(through), ..Default::default() };
            let err = launch::matvec_fused_forward(&ctx, &mut enc, one, fused).expect_err("refused");
            assert!(err.to_string().contains("norms its row itself"), "{err}");
        }
    }
}

/// The backward's products over shared LoRA intermediates, in every family against the twins:
/// a weight gradient reading dy and x as blocks of columns of wider matrices
/// (`launch::matmul_backward_w_cols`: a module's dB from its columns of h, its dA from its
/// columns of dh), scaled and added at an offset of the gradient buffer; and an input gradient
/// through dense rows gathered from blocks out of order (`launch::matmul_backward_gathered`: dx +=
/// dh A over the A matrices of q, k and v). Aligned and unaligned strides; what does not fit is
/// refused.
#[test]
fn lora_gradient_products_read_blocks_of_columns_and_gather_rows() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (tokens m, n, k, dy's stride and first column, x's stride and first column, rows a block)
        let cases = [
            (3, 5, 7, (9, 2), (7, 0), 2),
            (70, 16, 48, (48, 16), (52, 4), 8),
            (129, 8, 200, (24, 16), (203, 3), 3),
            (40, 24, 64, (24, 0), (128, 64), 8),
            // A reduction over 300 tokens, which the tiled families split into slices and a
            // second pass (which scatters the rows).
            (300, 48, 64, (48, 0), (64, 0), 16),
        ];
        for (i, &(m, n, k, (sd, cd), (sx, cx), per)) in cases.iter().enumerate() {
            let seed = 700 + 10 * i as u64;
            let dy = rand(m * n, seed, 1.0);
            let x = rand(m * k, seed + 1, 1.0);
            let embed = |v: &[f32], width: usize, (stride, col): (usize, usize), seed| {
                let mut wide = rand(m * stride, seed, 100.0);
                for r in 0..m {
                    wide[r * stride + col..][..width].copy_from_slice(&v[r * width..][..width]);
                }
                wide
            };
            let (dyb, xb) = (
                ctx.storage_from("dy", &embed(&dy, n, (sd, cd), seed + 2)),
                ctx.storage_from("x", &embed(&x, k, (sx, cx), seed + 3)),
            );
            // dw (n, k) at element 6 of a buffer, scaled by 0.5 and added to what is there.
            let dw0 = rand(6 + n * k, seed + 4, 1.0);
            let dwb = ctx.storage_from("dw", &dw0);
            let g =
                launch::WeightGrad { dy: &dyb, x: &xb, dw: &dwb, dw_offset: 6, m, n, k, alpha: 0.5, accumulate: true };
            let cols = launch::WeightGradCols { dy: Some((sd, cd)), x: Some((sx, cx)), ..Default::default() };
            run(&ctx, |enc| launch::matmul_backward_w_cols(&ctx, enc, g, cols));
            let want: Vec<f32> =
                dw0[6..].iter().zip(r::matmul_backward_w(&dy, &x, m, n, k)).map(|(a, b)| a + 0.5 * b).collect();
            let got = ctx.read_f32(&dwb, 6 + n * k).expect("readback");
            let what = format!("{} dW from column blocks {m}x{n}x{k}", ctx.report.kernels.matmul_grad);
            assert_close(&what, &got[6..], &want, 1e-5, 1e-5 * (m as f32).sqrt());
            assert_eq!(got[..6], dw0[..6], "{what}: wrote before its offset");
            // dx (m, k) += dy (m, n) W (n, k), W's rows in blocks of `per`, in the order 1, 2, 0.
            let w = rand(n * k, seed + 5, 0.5);
            let starts = [3 + 2 * per * k, 3, 3 + per * k];
            let mut blocks = rand(3 + 3 * per * k, seed + 6, 100.0);
            for j in 0..n.min(3 * per) {
                let at = starts[j / per] + (j % per) * k;
                blocks[at..at + k].copy_from_slice(&w[j * k..(j + 1) * k]);
            }
            let n = n.min(3 * per);
            let dy_n: Vec<f32> = (0..m).flat_map(|r| dy[r * cases[i].1..][..n].to_vec()).collect();
            let (dyn_b, wb) = (ctx.storage_from("dh", &dy_n), ctx.storage_from("blocks", &blocks));
            let dx0 = rand(m * k, seed + 7, 1.0);
            let dxb = ctx.storage_from("dx", &dx0);
            let gather = launch::Gather { rows: per, offsets: [starts[1], starts[2]] };
            let dg = launch::MatmulGrad {
                dy: launch::DyCols::whole(&dyn_b, n),
                w: launch::Weight::DenseAt(&wb, starts[0]),
                dx: &dxb,
                m,
                n,
                k,
                out: launch::OutCols::whole(k).accumulated(),
            };
            run(&ctx, |enc| launch::matmul_backward_gathered(&ctx, enc, dg, gather));
            let want: Vec<f32> =
                dx0.iter().zip(r::matmul_backward(&dy_n, &w[..n * k], m, n, k)).map(|(a, b)| a + b).collect();
            let what = format!("{} dX through gathered rows {m}x{n}x{k}", ctx.report.kernels.matmul_grad);
            assert_close(&what, &ctx.read_f32(&dxb, m * k).expect("readback"), &want, 1e-5, 1e-5 * (n as f32).sqrt());
            // And the other way: dw (n, k) += 0.5 dy_n^T x, its rows scattered to the same
            // blocks (order 1, 2, 0), x read from its block of columns; nothing else written.
            let dwb = ctx.storage_from("blocks", &blocks);
            let g = launch::WeightGrad {
                dy: &dyn_b,
                x: &xb,
                dw: &dwb,
                dw_offset: starts[0],
                m,
                n,
                k,
                alpha: 0.5,
                accumulate: true,
            };
            let cols = launch::WeightGradCols { x: Some((sx, cx)), dw_rows: Some(gather), ..Default::default() };
            run(&ctx, |enc| launch::matmul_backward_w_cols(&ctx, enc, g, cols));
            let mut want = blocks.clone();
            for (j, row) in r::matmul_backward_w(&dy_n, &x, m, n, k).chunks(k).enumerate() {
                let at = starts[j / per] + (j % per) * k;
                want[at..at + k].iter_mut().zip(row).for_each(|(w, d)| *w += 0.5 * d);
            }
            let what = format!("{} dW into scattered rows {m}x{n}x{k}", ctx.report.kernels.matmul_grad);
            let got = ctx.read_f32(&dwb, blocks.len()).expect("readback");
            assert_close(&what, &got, &want, 1e-5, 1e-5 * (m as f32).sqrt());
            // What does not fit is refused.
            let mut enc = ctx.encoder();
            let wide = launch::WeightGradCols { dy: Some((sd, sd - n + 1)), ..Default::default() };
            let err = launch::matmul_backward_w_cols(&ctx, &mut enc, g, wide).expect_err("past dy's row");
            assert!(err.to_string().contains("dy columns") && err.to_string().contains("do not fit"), "{err}");
            let few = launch::Gather { rows: per, offsets: [starts[1], 3 * per * k + 1] };
            let err = launch::matmul_backward_gathered(&ctx, &mut enc, dg, few).expect_err("a block past the buffer");
            assert!(err.to_string().contains("do not fit"), "{err}");
            let few = launch::WeightGradCols { dw_rows: Some(few), ..Default::default() };
            let err = launch::matmul_backward_w_cols(&ctx, &mut enc, g, few).expect_err("a block past dw");
            assert!(err.to_string().contains("dw scattered") && err.to_string().contains("do not fit"), "{err}");
        }
    }
}

/// tile128 runs a product whose grid of 128 x 128 tiles has fewer workgroups than
/// `tile128_min_groups` on its kernel's 64 x 64 variant (tile64), and a larger one on 128 x 128
/// tiles, never on portable's kernels: the forward,
/// the input gradient (grid over (tokens, in features)) and the weight gradient (over (out,
/// in features)), each against the reference. 0 keeps tile128 for all; the default is
/// `TILE128_MIN_GROUPS` and is reported.
#[test]
fn tile128_gives_products_with_small_grids_to_its_64_x_64_variant() {
    use edgetune::gpu::family::TILE128_MIN_GROUPS;
    use edgetune::gpu::{KernelFamily, Timer};
    let open = |min, max_workgroup_storage| {
        let opts = GpuOptions {
            kernels: Some(KernelFamily::Tile128),
            tile128_min_groups: min,
            max_workgroup_storage,
            ..Default::default()
        };
        GpuContext::new(&opts).expect("tile128 (lavapipe runs it)")
    };
    let default = open(None, None);
    assert_eq!(default.report.kernels.tile128_min_groups, TILE128_MIN_GROUPS);
    let said = default.report.kernels.to_string();
    assert!(said.contains(&format!("fewer than {TILE128_MIN_GROUPS} 128 x 128 tiles")), "{said}");
    // (tokens m, out features n, in features k): the forward's grid is n/128 x m/128, the
    // input gradient's k/128 x m/128, the weight gradient's k/128 x n/128.
    let (m, n, k) = (200, 300, 140);
    let x = rand(m * k, 1, 1.0);
    let w = rand(n * k, 2, 0.5);
    let dy = rand(m * n, 3, 1.0);
    let wants = [
        r::matmul_forward(&x, &w, None, m, n, k),
        r::matmul_backward(&dy, &w, m, n, k),
        r::matmul_backward_w(&dy, &x, m, n, k),
    ];
    // Threshold, and whether each of the three (grids 3 x 2 = 6, 2 x 2 = 4, 2 x 3 = 6) runs tile128;
    // last, a device with 16 KiB of workgroup memory, which holds only tile64's blocks.
    for (min, cap, tiled) in [
        (Some(0), None, [true; 3]),
        (Some(6), None, [true, false, true]),
        (Some(7), None, [false; 3]),
        (None, None, [false; 3]),
        (None, Some(16384), [false; 3]),
    ] {
        let ctx = open(min, cap);
        let min = (min, cap);
        let (xb, wb, dyb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &w), ctx.storage_from("dy", &dy));
        let (y, dx, dw) =
            (ctx.storage_zeroed("y", m * n), ctx.storage_zeroed("dx", m * k), ctx.storage_zeroed("dw", n * k));
        ctx.start_profiling(Timer::WallClock);
        run(&ctx, |enc| {
            let wt = launch::Weight::Dense(&wb);
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &xb, w: wt, bias: None, y: &y, m, n, k, out: launch::OutCols::whole(n) },
            )?;
            let dyc = launch::DyCols::whole(&dyb, n);
            launch::matmul_backward(
                &ctx,
                enc,
                launch::MatmulGrad { dy: dyc, w: wt, dx: &dx, m, n, k, out: launch::OutCols::whole(k) },
            )?;
            let g =
                launch::WeightGrad { dy: &dyb, x: &xb, dw: &dw, dw_offset: 0, m, n, k, alpha: 1.0, accumulate: false };
            launch::matmul_backward_w(&ctx, enc, g)
        });
        let names: Vec<&str> = ctx.stop_profiling().expect("profile").iter().map(|(name, _)| *name).collect();
        for (i, (portable, t128, t64)) in [
            ("matmul", "matmul_t128", "matmul_t128.tile64"),
            ("matmul_backward", "matmul_backward_t128", "matmul_backward_t128.tile64"),
            ("matmul_backward_w", "matmul_backward_w_t128", "matmul_backward_w_t128.tile64"),
        ]
        .iter()
        .enumerate()
        {
            let (ran, not) = if tiled[i] { (t128, t64) } else { (t64, t128) };
            let said = format!("threshold {min:?}, product {i}: {names:?}");
            assert!(names.contains(ran) && !names.contains(not) && !names.contains(portable), "{said}");
        }
        for (i, (buf, len)) in [(&y, m * n), (&dx, m * k), (&dw, n * k)].into_iter().enumerate() {
            let red = [k, n, m][i];
            let got = ctx.read_f32(buf, len).expect("read");
            assert_close(&format!("threshold {min:?}, product {i}"), &got, &wants[i], 1e-5, 1e-5 * (red as f32).sqrt());
        }
    }
}

/// tile128 runs the dense products with a side of at most `narrow_max` (48 by default; LoRA's
/// x A^T, dh = dy B, dB and dA) on its narrow blocks, 256 x 16 where the narrow side is the
/// columns (`.narrow`) and 16 x 256 where it is the rows (`.narrow_rows`), whatever their grid,
/// and a product with sides of 64 on tile64 as before; narrow_max 0 gives every one to tile64.
/// Ranks 1, 8, 16 and 48, 2,049 tokens and one, reductions that are no multiple of the blocks'
/// step of 8 and splits of them: each output against the twin within what two f32 sums of the
/// same red products in other orders may differ by, (2 red + 70) 2^-24 sum |a b| (γ of each
/// sum, with up to 64 slices added after).
#[test]
fn tile128_runs_the_narrow_products_of_lora_on_narrow_blocks() {
    use edgetune::gpu::{KernelFamily, Timer};
    let open = |narrow_max| {
        let opts = GpuOptions { kernels: Some(KernelFamily::Tile128), narrow_max, ..Default::default() };
        GpuContext::new(&opts).expect("tile128 (lavapipe runs it)")
    };
    let default = open(None);
    assert_eq!(default.report.kernels.narrow_max, edgetune::gpu::family::NARROW_MAX);
    let said = default.report.kernels.to_string();
    assert!(said.contains("LoRA's products (a side of at most 48) on 256 x 16 blocks"), "{said}");
    // (what, product, m, n, k): the forward's (0) outputs are (m, n) over k, the input
    // gradient's (1) (m, k) over n, the weight gradient's (2) (n, k) over m.
    let (forward, input_grad, weight_grad) = (0, 1, 2);
    let cases = [
        ("x A^T, rank 16", forward, 2049, 16, 200),
        ("x A^T of q, k and v, rank 16", forward, 300, 48, 77),
        ("x A^T, rank 1", forward, 70, 1, 576),
        ("x A^T, rank 64", forward, 300, 64, 200),
        ("forward of 5 rows", forward, 5, 300, 77),
        ("dh = dy B, rank 8", input_grad, 2049, 300, 8),
        ("dh = dy B, rank 48", input_grad, 90, 101, 48),
        ("input gradient of 3 rows", input_grad, 3, 100, 300),
        ("dB, rank 8", weight_grad, 2049, 300, 8),
        ("dB over one token, rank 16", weight_grad, 1, 300, 16),
        ("dA, rank 16", weight_grad, 2049, 16, 300),
        ("dA of q, k and v, rank 1", weight_grad, 517, 3, 131),
    ];
    for narrow_max in [None, Some(0)] {
        let ctx = open(narrow_max);
        for (i, &(what, kind, m, n, k)) in cases.iter().enumerate() {
            let seed = 300 + 10 * i as u64;
            let (x, w, dy) = (rand(m * k, seed, 1.0), rand(n * k, seed + 1, 0.5), rand(m * n, seed + 2, 1.0));
            // The output's shape, its reduction, the twin, and the operands of output (r, c).
            let (rows, cols, red) = [(m, n, k), (m, k, n), (n, k, m)][kind];
            let want = match kind {
                0 => r::matmul_forward(&x, &w, None, m, n, k),
                1 => r::matmul_backward(&dy, &w, m, n, k),
                _ => r::matmul_backward_w(&dy, &x, m, n, k),
            };
            let term = |r: usize, c: usize, j: usize| match kind {
                0 => x[r * k + j] * w[c * k + j],
                1 => dy[r * n + j] * w[j * k + c],
                _ => dy[j * n + r] * x[j * k + c],
            };
            let (xb, wb, dyb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &w), ctx.storage_from("dy", &dy));
            let out = ctx.storage_zeroed("out", rows * cols);
            ctx.start_profiling(Timer::WallClock);
            run(&ctx, |enc| {
                let wt = launch::Weight::Dense(&wb);
                match kind {
                    0 => launch::matmul_forward(
                        &ctx,
                        enc,
                        launch::Matmul { x: &xb, w: wt, bias: None, y: &out, m, n, k, out: launch::OutCols::whole(n) },
                    ),
                    1 => launch::matmul_backward(
                        &ctx,
                        enc,
                        launch::MatmulGrad {
                            dy: launch::DyCols::whole(&dyb, n),
                            w: wt,
                            dx: &out,
                            m,
                            n,
                            k,
                            out: launch::OutCols::whole(k),
                        },
                    ),
                    _ => launch::matmul_backward_w(
                        &ctx,
                        enc,
                        launch::WeightGrad {
                            dy: &dyb,
                            x: &xb,
                            dw: &out,
                            dw_offset: 0,
                            m,
                            n,
                            k,
                            alpha: 1.0,
                            accumulate: false,
                        },
                    ),
                }
            });
            let names: Vec<&str> = ctx.stop_profiling().expect("profile").iter().map(|(name, _)| *name).collect();
            let base = ["matmul_t128", "matmul_backward_t128", "matmul_backward_w_t128"][kind];
            let narrow = rows.min(cols) <= narrow_max.unwrap_or(48) as usize;
            let variant = match (narrow, cols <= rows) {
                (true, true) => "narrow",
                (true, false) => "narrow_rows",
                (false, _) => "tile64",
            };
            let kernel = format!("{base}.{variant}");
            let said = format!("{what} ({m}, {n}, {k}), narrow_max {narrow_max:?}: {names:?}");
            assert!(names.contains(&kernel.as_str()), "{said}: {kernel} did not run");
            assert!(names.iter().all(|n| *n == kernel || *n == "matmul_split_reduce"), "{said}");
            let got = ctx.read_f32(&out, rows * cols).expect("read");
            let gamma = (2 * red + 70) as f64 * 2f64.powi(-24);
            for (at, (&g, &e)) in got.iter().zip(&want).enumerate() {
                let (r, c) = (at / cols, at % cols);
                let mass: f64 = (0..red).map(|j| f64::from(term(r, c, j)).abs()).sum();
                let bound = gamma * mass;
                assert!(
                    (f64::from(g) - f64::from(e)).abs() <= bound,
                    "{said}: output ({r}, {c}) {g} against the twin's {e} (bound {bound:e})"
                );
            }
        }
    }
}

/// GGUF Q4_0 as it is stored (blocks of 32, its linear code book) through the NF4 kernels of
/// every family, against the reference on the values ggml's dequantization gives (held to
/// gguf-py's in gguf_blocks.rs).
#[test]
fn matmul_q4_0_matches_dequantized_reference() {
    use edgetune::quant::gguf_blocks::{self, GgmlType};
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k)) in [(1, 3, 64), (6, 70, 128), (9, 33, 192), (66, 65, 32), (1, 37, 576)].iter().enumerate() {
            let x = rand(m * k, 30 + i as u64, 1.0);
            let w = rand(n * k, 40 + i as u64, 0.3);
            let blocks = gguf_blocks::quantize(GgmlType::Q4_0, &w).expect("quantize");
            let wd = gguf_blocks::dequantize(GgmlType::Q4_0, &blocks, n * k).expect("dequantize");
            let (packed, scales) = gguf_blocks::q4_0_repacked(&blocks, n * k).expect("repack");
            let want = r::matmul_forward(&x, &wd, None, m, n, k);
            let xb = ctx.storage_from("x", &x);
            let (pb, sb) = (ctx.storage_from("packed", &packed), ctx.storage_from("scales", &scales));
            let w = launch::Weight::Q4_0 { packed: &pb, scales: &sb };
            check_matmul(&ctx, "matmul_q4_0", (&xb, w), (&x, &wd), None, &want, (m, n, k));
        }
    }
}

/// GGUF Q4_1 as it is stored (codes with each block's scale and minimum) through the NF4
/// kernels of every family, against the reference on ggml's dequantized values.
#[test]
fn matmul_q4_1_matches_dequantized_reference() {
    use edgetune::quant::gguf_blocks::{self, GgmlType};
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k)) in [(1, 3, 64), (6, 70, 128), (9, 33, 192), (66, 65, 32), (1, 37, 576)].iter().enumerate() {
            let x = rand(m * k, 50 + i as u64, 1.0);
            let blocks = common::q4_1_blocks(n * k, 60 + i as u64);
            let wd = gguf_blocks::dequantize(GgmlType::Q4_1, &blocks, n * k).expect("dequantize");
            let (packed, coeffs) = gguf_blocks::q4_1_repacked(&blocks, n * k).expect("repack");
            let want = r::matmul_forward(&x, &wd, None, m, n, k);
            let xb = ctx.storage_from("x", &x);
            let (pb, cb) = (ctx.storage_from("packed", &packed), ctx.storage_from("coeffs", &coeffs));
            let w = launch::Weight::Q4_1 { packed: &pb, coeffs: &cb, block_size: launch::Q4_0_BLOCK };
            check_matmul(&ctx, "matmul_q4_1", (&xb, w), (&x, &wd), None, &want, (m, n, k));
        }
    }
}

/// GGUF's 5-, 6- and 8-bit types as two 4-bit planes (two Q4_1 matmuls, the second added to
/// the first's output; the bias once) through every family, against the reference on ggml's
/// dequantized values (held to gguf-py's in gguf_blocks.rs). Where products run in f16
/// (coop16) each plane is rounded on its own, so the f16 bound takes |hi| + |lo| a weight.
#[test]
fn matmul_over_two_planes_matches_dequantized_reference() {
    use edgetune::quant::gguf_blocks::{self, GgmlType};
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        let types = [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q5K, GgmlType::Q6K];
        let shapes = [(1, 3, 256), (6, 70, 256), (66, 65, 512), (1, 37, 768)];
        for (i, (ty, &(m, n, k))) in types.iter().flat_map(|t| shapes.iter().map(move |s| (*t, s))).enumerate() {
            let x = rand(m * k, 70 + i as u64, 1.0);
            let b = rand(n, 90 + i as u64, 0.5);
            let blocks = common::planes_blocks(ty, n * k, 80 + i as u64, 0.3);
            let wd = gguf_blocks::dequantize(ty, &blocks, n * k).expect("dequantize");
            let planes = common::PlanesOnGpu::new(&ctx, ty, &blocks, n * k);
            let want = r::matmul_forward(&x, &wd, Some(&b), m, n, k);
            let (xb, bb) = (ctx.storage_from("x", &x), ctx.storage_from("b", &b));
            let operands = (&xb, planes.weight());
            check_matmul(
                &ctx,
                &format!("matmul_{}", ty.name()),
                operands,
                (&x, &planes.mass),
                Some(&bb),
                &want,
                (m, n, k),
            );
        }
    }
}

/// In every family, and in tile128 on a device with 16 KiB of workgroup memory (every product
/// on tile64's blocks, each kernel held to that limit).
#[test]
fn matmul_nf4_matches_dequantized_reference() {
    for ctx in gpus().into_iter().chain([common::small_workgroup_gpu()]) {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (3, 5, 40, 32): rows of 40 values, so NF4 blocks straddle rows (packed words never do).
        let shapes = [
            (1, 3, 64, 64),
            (6, 70, 128, 64),
            (9, 33, 192, 32),
            (2, 5, 256, 128),
            (3, 5, 40, 32),
            (66, 65, 40, 32),
            (1, 37, 576, 64),
        ];
        for (i, &(m, n, k, bs)) in shapes.iter().enumerate() {
            let x = rand(m * k, 10 + i as u64, 1.0);
            let w = rand(n * k, 20 + i as u64, 0.3);
            let q = nf4::quantize(&w, &[n, k], bs).expect("quantize");
            let wd = q.dequantize();
            let want = r::matmul_forward(&x, &wd, None, m, n, k);
            let xb = ctx.storage_from("x", &x);
            let (pb, ab) = (ctx.storage_from("packed", &q.packed), ctx.storage_from("absmax", &q.absmax));
            let w = launch::Weight::Nf4 { packed: &pb, absmax: &ab, block_size: bs };
            check_matmul(&ctx, &format!("matmul_nf4 block {bs}"), (&xb, w), (&x, &wd), None, &want, (m, n, k));
        }
    }
}

/// Decoding's products fuse the op before them into reading their input
/// (`matvec_fused_forward`): the RMSNorm, and SwiGLU's and GeGLU's gates. In every family and
/// weight format, on lengths that divide no kernel's chunk (K of 8, 70, 96, 200, 576 and 256
/// for two planes; N of 37 and 70), with a bias, alpha and accumulation, against the twins run
/// one after the other: `rms_norm_forward` (or `silu_mul_forward`, `gelu_mul_forward`), then
/// `matmul_forward` on the dequantized weight. The bound, from the maths (u = 2^-24): each side
/// sums K products (K u of sum_k |w x'| each, x' the normed or gated row); the norm's sides
/// also sum K squares (relative error up to K u each, so rstd differs by up to K u plus the
/// square roots' few ulps), so |got - want| <= (3K + 16) u alpha sum_k |w_jk x'_k|; a gate's
/// activation may differ from the twin's by the GPU's exp and tanh (Vulkan allows 3 + 2|g|
/// ulps for exp, 11 for the gates of at most 4 here, and the division 2.5) and its roundings:
/// 32 u |g up| a value, so (2K + 16) u alpha sum_k |w_jk x'_k| + 32 u alpha sum_k |w_jk g_k up_k|.
/// Plus 4u of the bias, the accumulated value and the result for the epilogue's roundings.
/// Where the weight is two planes each is summed on its own, so |hi| + |lo| is the weight's
/// mass. Each adds a LoRA B product of rank r (1 to 64, B at an offset) in its epilogue, which
/// sums r products: (r + 2) u scale sum_i |h_i B_ji| more. A product of more than one row is
/// refused, and so is a B that does not fit its buffer.
#[test]
fn a_one_row_product_with_its_norm_or_gate_and_lora_fused_matches_the_ops_then_the_product() {
    let u = 2f64.powi(-24);
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        let shapes = [(37, 8, 1), (70, 70, 8), (37, 96, 16), (70, 200, 5), (37, 576, 64), (70, 256, 3)];
        for (i, &(n, k, rank)) in shapes.iter().enumerate() {
            let seed = 300 + 10 * i as u64;
            // The adapter: h = x A^T (given), B (n, rank) from element 7 of its buffer.
            let (h, b_flat, lora_scale) = (rand(rank, seed + 10, 1.0), rand(7 + n * rank, seed + 11, 0.5), 1.5f32);
            // h from element 2 of its buffer.
            let hb = ctx.storage_from("h", &[vec![9.0, -9.0], h.clone()].concat());
            let pb = ctx.storage_from("lora", &b_flat);
            let lora = launch::LoraB {
                h: &hb,
                h_offset: 2,
                h_stride: rank,
                params: &pb,
                b_offset: 7,
                rank,
                scale: lora_scale,
            };
            let b_row = |j: usize| &b_flat[7 + j * rank..7 + (j + 1) * rank];
            let delta: Vec<f64> = (0..n)
                .map(|j| {
                    b_row(j).iter().zip(&h).map(|(b, h)| f64::from(*b) * f64::from(*h)).sum::<f64>()
                        * f64::from(lora_scale)
                })
                .collect();
            // Far from unit scale, so a missing rstd cannot pass.
            let x: Vec<f32> = rand(k, seed, 30.0);
            let g: Vec<f32> = rand(k, seed + 1, 0.5).iter().map(|v| v + 1.0).collect();
            let eps = 1e-6;
            let xn = r::rms_norm_forward(&x, &g, eps);
            let bias = rand(n, seed + 2, 0.5);
            let y0 = rand(n, seed + 3, 2.0);
            let w = rand(n * k, seed + 4, 0.3);
            let (xb, gb, bb) = (ctx.storage_from("x", &x), ctx.storage_from("g", &g), ctx.storage_from("b", &bias));
            let (gate, up) = (rand(k, seed + 8, 4.0), rand(k, seed + 9, 2.0));
            let (gateb, upb) = (ctx.storage_from("gate", &gate), ctx.storage_from("up", &up));
            let gate_up: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| (g * u).abs()).collect();
            // (label, the op, its input, the twin's row, K's factor in the bound, the gate's mass)
            let ops = [
                ("rms norm", launch::RowInput::RmsNorm { w: &gb, eps }, &xb, xn.clone(), 3, vec![0.0; k]),
                (
                    "silu gate",
                    launch::RowInput::SiluMul { up: &upb },
                    &gateb,
                    r::silu_mul_forward(&gate, &up),
                    2,
                    gate_up.clone(),
                ),
                (
                    "gelu gate",
                    launch::RowInput::GeluMul { up: &upb },
                    &gateb,
                    r::gelu_mul_forward(&gate, &up),
                    2,
                    gate_up,
                ),
            ];
            // The dense rows gathered from three blocks of a buffer, apart and out of order.
            let per = n.div_ceil(3);
            let starts = [2 * per * k + 8, 4, per * k + 6];
            let mut blocks = rand(3 * per * k + 8, seed + 12, 1.0);
            for j in 0..n {
                let at = starts[j / per] + (j % per) * k;
                blocks[at..at + k].copy_from_slice(&w[j * k..(j + 1) * k]);
            }
            let blocks_b = ctx.storage_from("blocks", &blocks);
            let gather = launch::Gather { rows: per, offsets: [starts[1], starts[2]] };
            let on_gpu = Formats::new(&ctx, &w, (n, k), seed, 64);
            let mut formats = on_gpu.list();
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
            formats.push(("dense gathered".into(), launch::Weight::DenseAt(&blocks_b, starts[0]), w.clone(), abs(&w)));
            for ((label, weight, wd, mass), (op, input, x, row, factor, gated)) in
                formats.iter().flat_map(|f| ops.iter().map(move |o| (f, o)))
            {
                let alpha = 0.75f32;
                let y = ctx.storage_from("y", &y0);
                let out = launch::OutCols::whole(n).scaled(alpha).accumulated();
                let mm = launch::Matmul { x, w: *weight, bias: Some(&bb), y: &y, m: 1, n, k, out };
                let gather = (label == "dense gathered").then_some(gather);
                let fused = launch::Fused { input: Some(*input), lora: Some(lora), gather };
                run(&ctx, |enc| launch::matvec_fused_forward(&ctx, enc, mm, fused));
                let got = ctx.read_f32(&y, n).expect("readback");
                let product = r::matmul_forward(row, wd, None, 1, n, k);
                let want: Vec<f32> =
                    (0..n).map(|j| (f64::from(alpha * product[j] + bias[j] + y0[j]) + delta[j]) as f32).collect();
                let slack: Vec<f32> = (0..n)
                    .map(|j| {
                        let sum = |v: &[f32]| -> f64 {
                            (0..k).map(|c| f64::from(mass[j * k + c]) * f64::from(v[c].abs())).sum()
                        };
                        let ends = f64::from(bias[j].abs() + y0[j].abs() + want[j].abs());
                        let products = (factor * k + 16) as f64 * u * sum(row);
                        let hb: f64 = b_row(j).iter().zip(&h).map(|(b, h)| f64::from((b * h).abs())).sum();
                        let lora = (rank + 2) as f64 * u * f64::from(lora_scale) * hb;
                        ((products + 32.0 * u * sum(gated)) * f64::from(alpha) + lora + 4.0 * u * ends) as f32
                    })
                    .collect();
                assert_close_slack(&format!("{op} matvec {label} 1x{n}x{k}"), &got, &want, 0.0, 0.0, &slack);
            }
            let two = launch::Matmul {
                x: &xb,
                w: launch::Weight::Dense(&on_gpu.dense),
                bias: None,
                y: &bb,
                m: 2,
                n,
                k: k / 2,
                out: launch::OutCols::whole(n),
            };
            let mut enc = ctx.encoder();
            let fused = launch::Fused { input: Some(launch::RowInput::RmsNorm { w: &gb, eps }), ..Default::default() };
            let err = launch::matvec_fused_forward(&ctx, &mut enc, two, fused).expect_err("two rows are refused");
            assert!(err.to_string().contains("one row, not 2"), "{err}");
            let one = launch::Matmul { m: 1, k, ..two };
            // Four values past its end: past the padding to whole vec4s too.
            let past = launch::LoraB { b_offset: 11, ..lora };
            let err = launch::matvec_fused_forward(
                &ctx,
                &mut enc,
                one,
                launch::Fused { lora: Some(past), ..Default::default() },
            )
            .expect_err("a B past its buffer is refused");
            assert!(err.to_string().contains("does not fit"), "{err}");
            // Blocks of rows past the buffer, or too few for the outputs, are refused.
            let gathered = launch::Matmul { w: launch::Weight::DenseAt(&blocks_b, starts[0]), ..one };
            for (rows, offsets) in [(per, [starts[1], 3 * per * k]), (per - 1, [starts[1], starts[2]])] {
                let bad = launch::Fused { gather: Some(launch::Gather { rows, offsets }), ..Default::default() };
                let err = launch::matvec_fused_forward(&ctx, &mut enc, gathered, bad).expect_err("refused");
                assert!(err.to_string().contains("do not fit"), "{err}");
            }
        }
    }
}

/// Which one-row kernel (decoding) each family runs, and what it gives: simd8 its own
/// register-tiled kernels (portable's where a dense weight sits at an offset that is no multiple
/// of 4), the GPU families (tile128, coop16, coop8, half) portable's kernels with their reduction in
/// subgroup operations (`.subgroup`) where the device has them and portable's own on a device
/// opened without them, portable its own. In every weight format, with the RMSNorm fused in
/// (whose sum of squares the reduction adds too) and a bias, over 70 outputs (the last workgroup
/// of 8 partly past them) and K = 256: against the twins' norm then product within
/// (3K + 16) u sum |w xn| + 4u (|bias| + |y|), the bound of the fused one-row test above.
/// `one_row_kernels_with_subgroups_of_4_and_16_lanes` runs it again at lavapipe's other widths.
#[test]
fn each_family_runs_its_own_one_row_kernels() {
    use edgetune::gpu::{KernelFamily, Timer};
    let u = 2f64.powi(-24);
    let opts = GpuOptions { kernels: Some(KernelFamily::Tile128), no_subgroups: true, ..Default::default() };
    let plain = GpuContext::new(&opts).expect("tile128 without subgroups");
    assert!(!plain.report.subgroups, "the device was opened with subgroups");
    let (n, k, eps) = (70, 256, 1e-6);
    let (w, x, bias) = (rand(n * k, 61, 0.3), rand(k, 62, 30.0), rand(n, 64, 0.5));
    let g: Vec<f32> = rand(k, 63, 0.5).iter().map(|v| v + 1.0).collect();
    let xn = r::rms_norm_forward(&x, &g, eps);
    for ctx in common::fresh_gpus().into_iter().chain([plain]) {
        let family = ctx.report.kernels.matmul;
        let reduced_in_subgroups = family.reduces_rows_in_subgroups() && ctx.report.subgroups;
        let (xb, gb, bb) = (ctx.storage_from("x", &x), ctx.storage_from("g", &g), ctx.storage_from("b", &bias));
        let formats = Formats::new(&ctx, &w, (n, k), 65, 64);
        for (label, weight, wd, mass) in formats.list() {
            let y = ctx.storage_zeroed("y", n);
            let mm = launch::Matmul {
                x: &xb,
                w: weight,
                bias: Some(&bb),
                y: &y,
                m: 1,
                n,
                k,
                out: launch::OutCols::whole(n),
            };
            let fused = launch::Fused { input: Some(launch::RowInput::RmsNorm { w: &gb, eps }), ..Default::default() };
            ctx.start_profiling(Timer::WallClock);
            run(&ctx, |enc| launch::matvec_fused_forward(&ctx, enc, mm, fused));
            let ran = ctx.stop_profiling().expect("profile");
            let what = format!("{label} on {} (subgroups {})", ctx.report.kernels.family, ctx.report.subgroups);
            assert!(!ran.is_empty(), "{what}: nothing ran");
            for (name, _) in &ran {
                let ok = match family {
                    KernelFamily::Simd8 if label != "dense at 3" => name.contains("_simd8.one_row"),
                    _ if reduced_in_subgroups => name.starts_with("matvec") && name.ends_with(".subgroup"),
                    _ => name.starts_with("matvec") && !name.contains("subgroup"),
                };
                assert!(ok, "{what} ran {name}");
            }
            let got = ctx.read_f32(&y, n).expect("readback");
            let product = r::matmul_forward(&xn, &wd, None, 1, n, k);
            let want: Vec<f32> = (0..n).map(|j| product[j] + bias[j]).collect();
            let slack: Vec<f32> = (0..n)
                .map(|j| {
                    let sum: f64 = (0..k).map(|c| f64::from(mass[j * k + c]) * f64::from(xn[c].abs())).sum();
                    let ends = f64::from(bias[j].abs() + want[j].abs());
                    ((3 * k + 16) as f64 * u * sum + 4.0 * u * ends) as f32
                })
                .collect();
            assert_close_slack(&format!("rms norm matvec: {what}"), &got, &want, 0.0, 0.0, &slack);
        }
    }
}

#[test]
fn one_row_kernels_with_subgroups_of_4_and_16_lanes() {
    for lanes in common::other_subgroup_sizes(&gpus()[0]) {
        common::rerun_with_subgroups_of("each_family_runs_its_own_one_row_kernels", lanes);
    }
}

/// Prompts and training add each adapted module's LoRA B product to its base product as more of
/// the base product's reduction (`launch::matmul_lora_forward`): y = alpha (x W^T + (scale /
/// alpha) h B^T) (+ bias) (+ y), one dispatch. In every family and weight format (NF4 in blocks
/// of 32, Q4_0, Q4_1, Q6_K's two planes where K allows), against the twin's base product plus
/// the B product summed in f64: M from 2 to 130, K of 8 to 576 (not a multiple of the tiles'
/// step of 16, so zeros pad x's last step before h's columns), r of 1, 5, 8, 16 and 64, h read
/// at a row stride and first column of a wider buffer, with a bias, alpha and accumulation; the
/// tiled families split the long reductions of the small grids here (h's columns in the last
/// slice). The bound is `wanted_with_slack`'s over K + r products (their mass alpha sum |x w| +
/// scale sum |h B|, with scale / alpha rounded once more), the bias and the accumulated value;
/// coop16's f16 operands add `f16_slack` over both blocks of the reduction.
/// Refused: one row, an h or B past its buffer, h's columns past its row, and alpha 0.
#[test]
fn a_many_row_product_with_a_lora_b_product_fused_in_matches_the_two_products() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (rows, outputs, reduction, rank, h's row stride, h's first column)
        let shapes = [
            (2, 37, 40, 1, 1, 0),
            (33, 70, 96, 16, 51, 17),
            (130, 37, 8, 5, 5, 0),
            (3, 37, 576, 64, 64, 0),
            (17, 9, 256, 8, 26, 9),
        ];
        for (i, &(m, n, k, rank, h_stride, h_col)) in shapes.iter().enumerate() {
            let seed = 900 + 10 * i as u64;
            let x = rand(m * k, seed, 1.0);
            let w = rand(n * k, seed + 1, 0.3);
            let bias = rand(n, seed + 2, 0.5);
            let y0 = rand(m * n, seed + 3, 2.0);
            // h's rows at h_stride, from column h_col; B (n, rank) from element 7.
            let h_all = rand(m * h_stride, seed + 4, 1.0);
            let h_at = |r: usize, c: usize| h_all[r * h_stride + h_col + c];
            let b_flat = rand(7 + n * rank, seed + 5, 0.5);
            let b_at = |c: usize, j: usize| b_flat[7 + c * rank + j];
            let (alpha, scale) = (0.75f32, 1.5f32);
            let (xb, bb, hb, pb) = (
                ctx.storage_from("x", &x),
                ctx.storage_from("bias", &bias),
                ctx.storage_from("h", &h_all),
                ctx.storage_from("lora", &b_flat),
            );
            let lora = launch::LoraB { h: &hb, h_offset: h_col, h_stride, params: &pb, b_offset: 7, rank, scale };
            let on_gpu = Formats::new(&ctx, &w, (n, k), seed, 32);
            for (label, weight, wd, mass) in on_gpu.list() {
                let y = ctx.storage_from("y", &y0);
                let out = launch::OutCols::whole(n).scaled(alpha).accumulated();
                let mm = launch::Matmul { x: &xb, w: weight, bias: Some(&bb), y: &y, m, n, k, out };
                run(&ctx, |enc| launch::matmul_lora_forward(&ctx, enc, mm, lora, None));
                let got = ctx.read_f32(&y, m * n).expect("readback");
                let product = r::matmul_forward(&x, &wd, None, m, n, k);
                let hb_sum = |r: usize, c: usize, f: fn(f64) -> f64| -> f64 {
                    (0..rank).map(|j| f(f64::from(h_at(r, j)) * f64::from(b_at(c, j)))).sum()
                };
                let f16 = f16_slack(
                    f16_products(&ctx),
                    (m, n, k + rank),
                    alpha,
                    |r, j| if j < k { x[r * k + j] } else { h_at(r, j - k) },
                    |c, j| if j < k { wd[c * k + j] } else { scale / alpha * b_at(c, j - k) },
                );
                let (want, slack) = wanted_with_slack(f16, (m, n), (k, rank), |r, c| {
                    let at = r * n + c;
                    let v = f64::from(alpha * product[at] + bias[c] + y0[at]) + f64::from(scale) * hb_sum(r, c, |v| v);
                    let xw: f64 = (0..k).map(|j| f64::from(x[r * k + j].abs() * mass[c * k + j])).sum();
                    let mass = f64::from(alpha) * xw + f64::from(scale) * hb_sum(r, c, f64::abs);
                    (v, mass, f64::from(bias[c].abs() + y0[at].abs()))
                });
                assert_close_slack(
                    &format!("{label} with a B of rank {rank} {m}x{n}x{k}"),
                    &got,
                    &want,
                    0.0,
                    0.0,
                    &slack,
                );
            }
            let mm = launch::Matmul {
                x: &xb,
                w: launch::Weight::Dense(&on_gpu.dense),
                bias: None,
                y: &bb,
                m,
                n,
                k,
                out: launch::OutCols::whole(n),
            };
            let mut enc = ctx.encoder();
            let refused = [
                (launch::Matmul { m: 1, y: &hb, ..mm }, lora, "reads one row"),
                (mm, launch::LoraB { b_offset: 11, ..lora }, "does not fit"),
                (mm, launch::LoraB { h_offset: h_stride - rank + 1, ..lora }, "do not fit h"),
                (mm, launch::LoraB { h_stride: h_stride + 8, ..lora }, "do not fit h"),
                (launch::Matmul { out: launch::OutCols::whole(n).scaled(0.0), ..mm }, lora, "alpha cannot be 0"),
            ];
            for (mm, lora, why) in refused {
                let err = launch::matmul_lora_forward(&ctx, &mut enc, mm, lora, None).expect_err(why);
                assert!(err.to_string().contains(why), "{err}");
            }
        }
    }
}

/// Training's backward pass sums dh A into the input gradient through the base weight of the
/// last module of each group that reads one input, as more of that product's reduction
/// (`launch::matmul_backward_lora`): dx = alpha (dy W + (1 / alpha) dh A) (+ dx), A's rows
/// gathered from three blocks of the adapter's buffer out of order. In every family and weight
/// format (NF4 in blocks of 32, Q4_0, Q4_1, Q6_K's two planes where K allows), against the
/// twin's input gradient plus dh A summed in f64: M from 2 to 130, N of 8 to 576 (not all
/// multiples of 16, so zeros pad dy's last step before dh's columns), K of 8 to 256, dh of 3 to
/// 64 columns over blocks of 1 to 64 rows, added to dx scaled; the tiled families split the
/// long reductions of the small grids here. The bound is `wanted_with_slack`'s over N + n
/// products (their mass alpha sum |dy w| + sum |dh A|) and the accumulated value; coop16's f16
/// operands add `f16_slack` over both blocks of the reduction. Refused: one row, alpha 0, a dh short of its rows and blocks of A
/// past the buffer or too few for dh's columns.
#[test]
fn a_many_row_input_gradient_with_a_lora_dh_a_fused_in_matches_the_two_products() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (rows m, the weight's rows n, its columns k, A's rows a block, dh's columns)
        let shapes =
            [(2, 37, 40, 1, 3), (33, 70, 96, 16, 48), (130, 12, 8, 5, 10), (3, 576, 64, 64, 64), (17, 40, 256, 8, 24)];
        for (i, &(m, n, k, rows, cols)) in shapes.iter().enumerate() {
            let seed = 1300 + 10 * i as u64;
            let dy = rand(m * n, seed, 1.0);
            let w = rand(n * k, seed + 1, 0.3);
            let y0 = rand(m * k, seed + 2, 2.0);
            let dh = rand(m * cols, seed + 3, 1.0);
            // The blocks of A: block b's rows at starts[b], apart and out of order.
            let starts = [2 * rows * k + 9, 5, rows * k + 7];
            let params = rand(3 * rows * k + 9, seed + 4, 0.5);
            let a_at = |j: usize, c: usize| params[starts[j / rows] + (j % rows) * k + c];
            let alpha = 0.75f32;
            let (dyb, dhb, pb) =
                (ctx.storage_from("dy", &dy), ctx.storage_from("dh", &dh), ctx.storage_from("lora", &params));
            let gather = launch::Gather { rows, offsets: [starts[1], starts[2]] };
            let lora = launch::LoraDx { dh: &dhb, n: cols, params: &pb, first: starts[0], gather };
            let on_gpu = Formats::new(&ctx, &w, (n, k), seed, 32);
            for (label, weight, wd, mass) in on_gpu.list() {
                let dx = ctx.storage_from("dx", &y0);
                let out = launch::OutCols::whole(k).scaled(alpha).accumulated();
                let g = launch::MatmulGrad { dy: launch::DyCols::whole(&dyb, n), w: weight, dx: &dx, m, n, k, out };
                run(&ctx, |enc| launch::matmul_backward_lora(&ctx, enc, g, lora));
                let got = ctx.read_f32(&dx, m * k).expect("readback");
                let product = r::matmul_backward(&dy, &wd, m, n, k);
                let dh_a = |r: usize, c: usize, f: fn(f64) -> f64| -> f64 {
                    (0..cols).map(|j| f(f64::from(dh[r * cols + j]) * f64::from(a_at(j, c)))).sum()
                };
                let f16 = f16_slack(
                    f16_products(&ctx),
                    (m, k, n + cols),
                    alpha,
                    |r, j| if j < n { dy[r * n + j] } else { dh[r * cols + j - n] },
                    |c, j| if j < n { wd[j * k + c] } else { a_at(j - n, c) / alpha },
                );
                let (want, slack) = wanted_with_slack(f16, (m, k), (n, cols), |r, c| {
                    let at = r * k + c;
                    let v = f64::from(alpha * product[at] + y0[at]) + dh_a(r, c, |v| v);
                    let dw: f64 = (0..n).map(|j| f64::from(dy[r * n + j].abs() * mass[j * k + c])).sum();
                    (v, f64::from(alpha) * dw + dh_a(r, c, f64::abs), f64::from(y0[at].abs()))
                });
                assert_close_slack(
                    &format!("{label} dX with dh A of {cols} {m}x{n}x{k}"),
                    &got,
                    &want,
                    0.0,
                    0.0,
                    &slack,
                );
            }
            let g = launch::MatmulGrad {
                dy: launch::DyCols::whole(&dyb, n),
                w: launch::Weight::Dense(&on_gpu.dense),
                dx: &dyb,
                m,
                n,
                k,
                out: launch::OutCols::whole(k),
            };
            let mut enc = ctx.encoder();
            let refused = [
                (launch::MatmulGrad { m: 1, ..g }, lora, "two rows or more"),
                (launch::MatmulGrad { out: launch::OutCols::whole(k).scaled(0.0), ..g }, lora, "alpha cannot be 0"),
                (g, launch::LoraDx { n: cols + 8, ..lora }, "dh holds fewer"),
                (
                    g,
                    launch::LoraDx { gather: launch::Gather { rows, offsets: [starts[1], 3 * rows * k + 6] }, ..lora },
                    "do not fit",
                ),
                (
                    g,
                    launch::LoraDx { gather: launch::Gather { rows: cols.div_ceil(3) - 1, ..gather }, ..lora },
                    "do not fit",
                ),
            ];
            for (g, lora, why) in refused {
                let err = launch::matmul_backward_lora(&ctx, &mut enc, g, lora).expect_err(why);
                assert!(err.to_string().contains(why), "{err}");
            }
        }
    }
}

/// The wanted values of an (m, n) product whose reduction runs over `base` products and then
/// `extra` more (a LoRA product fused in), and each one's slack, added to `f16`'s (empty where
/// the kernel multiplies in f32). `exact(r, c)` gives the value in f64, the mass of its
/// products (the sum of their magnitudes) and that of the other terms summed in (a bias, the
/// accumulated value). The bound (u = 2^-24): the kernel sums base + extra products in f32 in
/// any order, the twin base, so (2 base + extra + 16) u of the mass, plus 4u of the other terms
/// and of the result.
fn wanted_with_slack(
    f16: Vec<f32>,
    (m, n): (usize, usize),
    (base, extra): (usize, usize),
    exact: impl Fn(usize, usize) -> (f64, f64, f64),
) -> (Vec<f32>, Vec<f32>) {
    let u = 2f64.powi(-24);
    let (mut want, mut slack) = (Vec::with_capacity(m * n), Vec::with_capacity(m * n));
    for r in 0..m {
        for c in 0..n {
            let (v, mass, others) = exact(r, c);
            want.push(v as f32);
            let bound = ((2 * base + extra + 16) as f64 * u * mass + 4.0 * u * (others + v.abs())) as f32;
            slack.push(bound + f16.get(r * n + c).copied().unwrap_or(0.0));
        }
    }
    (want, slack)
}

/// A weight of (n, k) in each format its shape allows, on the GPU: dense, dense at an offset,
/// f16, NF4 (K % 8 == 0, blocks of `block`), Q4_0 (K % 32 == 0, `w` quantized) and Q4_1 (random
/// blocks), and Q6_K's two planes (K % 256 == 0, random blocks).
struct Formats {
    w: Vec<f32>,
    dense: wgpu::Buffer,
    at: wgpu::Buffer,
    f16: (Vec<f32>, wgpu::Buffer),
    nf4: Option<(Vec<f32>, wgpu::Buffer, wgpu::Buffer, usize)>,
    /// Q4_0's and Q4_1's dequantized values, codes and coefficients.
    q4: Option<Q4Pair>,
    planes: Option<(Vec<f32>, common::PlanesOnGpu)>,
}

type Q4Pair = ([Vec<f32>; 2], [wgpu::Buffer; 2], [wgpu::Buffer; 2]);

impl Formats {
    fn new(ctx: &GpuContext, w: &[f32], (n, k): (usize, usize), seed: u64, block: usize) -> Formats {
        use edgetune::quant::gguf_blocks::{self, GgmlType};
        let mut shifted = rand(3, seed + 5, 1.0);
        shifted.extend(w);
        let halves: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let nf4 = k.is_multiple_of(8).then(|| {
            let q = nf4::quantize(w, &[n, k], block).expect("quantize");
            (q.dequantize(), ctx.storage_from("packed", &q.packed), ctx.storage_from("absmax", &q.absmax), block)
        });
        let q4 = k.is_multiple_of(32).then(|| {
            let q4_0 = gguf_blocks::quantize(GgmlType::Q4_0, w).expect("quantize");
            let (packed, scales) = gguf_blocks::q4_0_repacked(&q4_0, n * k).expect("repack");
            let wd0 = gguf_blocks::dequantize(GgmlType::Q4_0, &q4_0, n * k).expect("dequantize");
            let q4_1 = common::q4_1_blocks(n * k, seed + 6);
            let (packed1, coeffs) = gguf_blocks::q4_1_repacked(&q4_1, n * k).expect("repack");
            let wd1 = gguf_blocks::dequantize(GgmlType::Q4_1, &q4_1, n * k).expect("dequantize");
            let bufs = [&packed, &packed1].map(|p| ctx.storage_from("codes", p));
            let coeffs = [&scales, &coeffs].map(|c| ctx.storage_from("coefficients", c));
            ([wd0, wd1], bufs, coeffs)
        });
        let planes = k.is_multiple_of(256).then(|| {
            let blocks = common::planes_blocks(GgmlType::Q6K, n * k, seed + 7, 0.3);
            let wd = gguf_blocks::dequantize(GgmlType::Q6K, &blocks, n * k).expect("dequantize");
            (wd, common::PlanesOnGpu::new(ctx, GgmlType::Q6K, &blocks, n * k))
        });
        Formats {
            w: w.to_vec(),
            dense: ctx.storage_from("w", w),
            at: ctx.storage_from("w at 3", &shifted),
            f16: (halves.iter().map(|h| h.to_f32()).collect(), ctx.storage_from("w f16", &halves)),
            nf4,
            q4,
            planes,
        }
    }

    /// (label, the weight, its dequantized values, their mass: |w|, or |hi| + |lo| for planes).
    fn list(&self) -> Vec<(String, launch::Weight<'_>, Vec<f32>, Vec<f32>)> {
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
        let w = &self.w;
        let mut out = vec![
            ("dense".into(), launch::Weight::Dense(&self.dense), w.clone(), abs(w)),
            ("dense at 3".into(), launch::Weight::DenseAt(&self.at, 3), w.clone(), abs(w)),
            ("f16".into(), launch::Weight::F16(&self.f16.1), self.f16.0.clone(), abs(&self.f16.0)),
        ];
        if let Some((wd, pb, ab, block_size)) = &self.nf4 {
            let w4 = launch::Weight::Nf4 { packed: pb, absmax: ab, block_size: *block_size };
            out.push((format!("nf4 block {block_size}"), w4, wd.clone(), abs(wd)));
        }
        if let Some(([wd0, wd1], [p0, p1], [s0, c1])) = &self.q4 {
            out.push(("q4_0".into(), launch::Weight::Q4_0 { packed: p0, scales: s0 }, wd0.clone(), abs(wd0)));
            let w1 = launch::Weight::Q4_1 { packed: p1, coeffs: c1, block_size: launch::Q4_0_BLOCK };
            out.push(("q4_1".into(), w1, wd1.clone(), abs(wd1)));
        }
        if let Some((wd, planes)) = &self.planes {
            out.push(("q6_k planes".into(), planes.weight(), wd.clone(), planes.mass.clone()));
        }
        out
    }
}

#[test]
fn rms_norm_silu_gelu_add_embedding_match_reference() {
    let ctx = ctx();
    for &(rows, dim) in &[(1, 1), (3, 65), (7, 200)] {
        let x = rand(rows * dim, 3, 2.0);
        let w = rand(dim, 4, 1.0);
        let (xb, wb, yb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &w), ctx.storage_zeroed("y", rows * dim));
        run(&ctx, |enc| {
            launch::rms_norm_forward(
                &ctx,
                enc,
                launch::RmsNorm { x: &xb, w: &wb, y: &yb, n_rows: rows, dim, eps: 1e-5 },
            )
        });
        assert_close(
            "rms_norm",
            &ctx.read_f32(&yb, rows * dim).expect("read"),
            &r::rms_norm_forward(&x, &w, 1e-5),
            1e-5,
            1e-6,
        );
        // The pair variant: this tensor and another of more rows and its own weight, in one
        // dispatch, each as its twin norms it alone.
        let (x2, w2) = (rand((rows + 2) * dim, 13, 3.0), rand(dim, 14, 1.0));
        let (x2b, w2b) = (ctx.storage_from("x2", &x2), ctx.storage_from("w2", &w2));
        let (ya, yb2) = (ctx.storage_zeroed("y", rows * dim), ctx.storage_zeroed("y2", (rows + 2) * dim));
        let dispatches = run(&ctx, |enc| {
            let a = launch::RmsNorm { x: &xb, w: &wb, y: &ya, n_rows: rows, dim, eps: 1e-5 };
            launch::rms_norm_pair_forward(
                &ctx,
                enc,
                [a, launch::RmsNorm { x: &x2b, w: &w2b, y: &yb2, n_rows: rows + 2, ..a }],
            )
        });
        assert_eq!(dispatches, 1, "one dispatch for both");
        let (got_a, got_b) =
            (ctx.read_f32(&ya, rows * dim).expect("read"), ctx.read_f32(&yb2, (rows + 2) * dim).expect("read"));
        assert_close("rms_norm pair, first", &got_a, &r::rms_norm_forward(&x, &w, 1e-5), 1e-5, 1e-6);
        assert_close("rms_norm pair, second", &got_b, &r::rms_norm_forward(&x2, &w2, 1e-5), 1e-5, 1e-6);
        let mut enc = ctx.encoder();
        let a = launch::RmsNorm { x: &xb, w: &wb, y: &ya, n_rows: rows, dim, eps: 1e-5 };
        let err = launch::rms_norm_pair_forward(&ctx, &mut enc, [a, launch::RmsNorm { dim: dim + 1, ..a }])
            .expect_err("widths differ")
            .to_string();
        assert!(err.contains("width"), "{err}");

        let up = rand(rows * dim, 5, 2.0);
        let ub = ctx.storage_from("up", &up);
        run(&ctx, |enc| launch::silu_mul_forward(&ctx, enc, &xb, &ub, &yb, rows * dim));
        assert_close(
            "silu_mul",
            &ctx.read_f32(&yb, rows * dim).expect("read"),
            &r::silu_mul_forward(&x, &up),
            1e-5,
            1e-6,
        );

        // GELU's tanh approximation: the twin computes in f64; tanh and the cube round in f32.
        run(&ctx, |enc| launch::gelu_mul_forward(&ctx, enc, &xb, &ub, &yb, rows * dim));
        assert_close(
            "gelu_mul",
            &ctx.read_f32(&yb, rows * dim).expect("read"),
            &r::gelu_mul_forward(&x, &up),
            1e-5,
            1e-6,
        );

        let mut want = up.clone();
        r::add_forward(&x, &mut want);
        run(&ctx, |enc| launch::add_forward(&ctx, enc, &xb, &ub, rows * dim));
        assert_close("add", &ctx.read_f32(&ub, rows * dim).expect("read"), &want, 0.0, 0.0);
    }
    // Embedding split in two row chunks, as large tables are.
    let (vocab, dim) = (37, 19);
    let table = rand(vocab * dim, 9, 1.0);
    let ids: Vec<u32> = vec![0, 36, 5, 20, 19, 18];
    let idb = ctx.storage_from("ids", &ids);
    let out = ctx.storage_zeroed("out", ids.len() * dim);
    let split = 19;
    let t0 = ctx.storage_from("t0", &table[..split * dim]);
    let t1 = ctx.storage_from("t1", &table[split * dim..]);
    // Gemma's sqrt(hidden size) for a hidden size of 1152: one f32 product a value.
    let scale = 1152f32.sqrt();
    run(&ctx, |enc| {
        launch::embedding_forward(
            &ctx,
            enc,
            launch::Embedding {
                ids: &idb,
                table: launch::Rows::F32(&t0),
                out: &out,
                n_tokens: ids.len(),
                dim,
                row_start: 0,
                row_count: split,
                scale,
            },
        )?;
        launch::embedding_forward(
            &ctx,
            enc,
            launch::Embedding {
                ids: &idb,
                table: launch::Rows::F32(&t1),
                out: &out,
                n_tokens: ids.len(),
                dim,
                row_start: split,
                row_count: vocab - split,
                scale,
            },
        )
    });
    let want: Vec<f32> = r::embedding_forward(&table, dim, &ids).iter().map(|v| v * scale).collect();
    assert_close("embedding", &ctx.read_f32(&out, ids.len() * dim).expect("read"), &want, 0.0, 0.0);
}

/// RoPE rotates the query heads and the key heads (fewer of them, as with GQA) in one
/// dispatch, each as its twin does alone.
#[test]
fn rope_matches_reference() {
    let ctx = ctx();
    // (2100, 32, 8): more token-heads than one dispatch dimension may hold (65535).
    // (3, 2, 128, 96): partial RoPE, as Phi-4-mini's (96 of 128 values a head rotate).
    for &(t, (h, kv), hd, rd, pos) in &[
        (1, (1, 1), 2, 2, 0),
        (5, (3, 1), 64, 64, 7),
        (4, (2, 2), 130, 130, 100),
        (2100, (32, 8), 8, 8, 0),
        (3, (2, 1), 128, 96, 5),
    ] {
        let inv: Vec<f32> = (0..rd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rd as f32)).collect();
        let table = r::rope_table(&inv, pos + t);
        let (q, k) = (rand(t * h * hd, 11, 1.0), rand(t * kv * hd, 12, 1.0));
        let (mut want_q, mut want_k) = (q.clone(), k.clone());
        let positions: Vec<usize> = (pos..pos + t).collect();
        r::rope_forward(&mut want_q, &table, h, (hd, rd), &positions);
        r::rope_forward(&mut want_k, &table, kv, (hd, rd), &positions);
        let (qb, kb) = (ctx.storage_from("q", &q), ctx.storage_from("k", &k));
        let tb = ctx.storage_from("cos_sin", &table);
        let pb = ctx.storage_from("positions", &(0..t as u32).collect::<Vec<_>>());
        let shape = launch::RopeShape {
            n_tokens: t,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            rot_dim: rd,
            pos_offset: pos,
            positions: &pb,
        };
        run(&ctx, |enc| launch::rope_forward(&ctx, enc, [&qb, &kb], &tb, shape));
        assert_close("rope q", &ctx.read_f32(&qb, q.len()).expect("read"), &want_q, 1e-6, 1e-6);
        assert_close("rope k", &ctx.read_f32(&kb, k.len()).expect("read"), &want_k, 1e-6, 1e-6);
        // The backward rotation undoes the forward one (rotations are orthogonal).
        run(&ctx, |enc| launch::rope_backward(&ctx, enc, [&qb, &kb], &tb, shape));
        assert_close("rope backward of rope, q", &ctx.read_f32(&qb, q.len()).expect("read"), &q, 1e-6, 1e-6);
        assert_close("rope backward of rope, k", &ctx.read_f32(&kb, k.len()).expect("read"), &k, 1e-6, 1e-6);
    }
}

/// The tiled families' attention combines each row's maximum and sum over as many lanes as the
/// subgroup has, its size read at run time (`common/attention_rows.wgsl`), where lavapipe's
/// subgroups have 8: the test below again with subgroups of 4 lanes and, on a CPU with AVX-512,
/// 16.
#[test]
fn attention_matches_reference_with_subgroups_of_4_and_16_lanes() {
    for lanes in common::other_subgroup_sizes(&gpus()[0]) {
        common::rerun_with_subgroups_of("attention_matches_reference_with_gqa_and_cache_offset", lanes);
    }
}

#[test]
fn attention_matches_reference_with_gqa_and_cache_offset() {
    // And tile128 on a device opened without subgroup operations, whose blocked forward kernel
    // then reduces its rows in workgroup memory alone (attention_t128.shared).
    let opts =
        GpuOptions { kernels: Some(edgetune::gpu::KernelFamily::Tile128), no_subgroups: true, ..Default::default() };
    let plain = GpuContext::new(&opts).expect("tile128 without subgroups");
    assert!(!plain.report.subgroups, "the device was opened with subgroups");
    for ctx in gpus().into_iter().chain([std::sync::Arc::new(plain)]) {
        // Cases 1, 3 and 5 with Gemma 2's soft cap, at 0.3 (these scores reach about 1.5).
        for (i, &(t, h, kvh, hd, pos)) in [
            (1, 1, 1, 8, 0),
            (5, 4, 2, 16, 0),
            (3, 6, 2, 64, 70),
            (2, 2, 1, 130, 3),
            (11, 4, 2, 96, 5),
            (20, 3, 1, 64, 0),
            // Past one block of 64 queries: a head of two halves (72 = 64 + 8 dims, not a
            // multiple of the 16-dim chunks), and a full 128 behind a cache.
            (70, 4, 2, 72, 0),
            (130, 2, 1, 128, 9),
            // Heads past 128 dims, which the blocked kernels write 128 dims at a time: Gemma's
            // 256, and 200 (a second block of 72).
            (70, 4, 2, 256, 0),
            (66, 2, 1, 200, 6),
        ]
        .iter()
        .enumerate()
        {
            let softcap = (i % 2 == 1).then_some(0.3);
            let case = r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: pos, softcap };
            let q = rand(t * h * hd, 31, 1.0);
            let k = rand((pos + t) * kvh * hd, 32, 1.0);
            let v = rand((pos + t) * kvh * hd, 33, 1.0);
            let want = r::attention_forward(&q, &k, &v, &vec![0; t], case);
            let got = gpu_attention(&ctx, [&q, &k, &v], &vec![0; t], case);
            let what = format!("{} attention t{t} h{h}/{kvh} hd{hd} pos{pos} cap {softcap:?}", ctx.report.kernels);
            assert_close(&what, &got.out, &want, 1e-4, 1e-5);
            // The same sequence in a pool of caches, behind 37 positions of another's larger keys.
            let other = |seed| rand(37 * kvh * hd, seed, 3.0);
            let (k_pool, v_pool) = ([other(34), k].concat(), [other(35), v].concat());
            let at = gpu_attention_at(&ctx, [&q, &k_pool, &v_pool], &vec![0; t], case, 37);
            assert_close(&format!("{what} at key 37"), &at.out, &want, 1e-4, 1e-5);
        }
    }
}

/// The attention shape of `t` queries in a CPU twin's case, scaled by 1 / sqrt(head_dim).
fn attention_shape(t: usize, c: r::AttentionCase) -> launch::AttentionShape {
    launch::AttentionShape {
        n_tokens: t,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        pos_offset: c.pos_offset,
        key_base: 0,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        softcap: c.softcap,
    }
}

/// What the GPU's attention forward gives for a CPU twin's case.
struct GpuAttention {
    out: Vec<f32>,
    /// Each (query, head)'s log-sum-exp, from the stats pairs.
    lse: Vec<f32>,
    /// Dispatches the launcher recorded.
    dispatches: u64,
}

/// Runs `launch::attention_forward` on queries, keys and values with each query's first
/// visible key (`starts`, one per query).
fn gpu_attention(ctx: &GpuContext, kv: [&[f32]; 3], starts: &[usize], c: r::AttentionCase) -> GpuAttention {
    gpu_attention_at(ctx, kv, starts, c, 0)
}

/// [`gpu_attention`] of a sequence whose position 0 lies at `key_base` of the keys and values
/// (a cache's slot in a pool of caches), `starts` counted from there.
fn gpu_attention_at(
    ctx: &GpuContext,
    [q, k, v]: [&[f32]; 3],
    starts: &[usize],
    c: r::AttentionCase,
    key_base: usize,
) -> GpuAttention {
    let (t, h) = (starts.len(), c.n_heads);
    let (qb, kb, vb) = (ctx.storage_from("q", q), ctx.storage_from("k", k), ctx.storage_from("v", v));
    let starts: Vec<u32> = starts.iter().map(|&s| (key_base + s) as u32).collect();
    let ks = ctx.storage_from("key start", &starts);
    let (out, stats) = (ctx.storage_zeroed("o", q.len()), ctx.storage_zeroed("stats", 2 * t * h));
    let dispatches = run(ctx, |enc| {
        let io = launch::AttentionIo { q: &qb, k: &kb, v: &vb, key_start: &ks, out: &out, stats: &stats };
        launch::attention_forward(ctx, enc, io, launch::AttentionShape { key_base, ..attention_shape(t, c) })
    });
    let lse = ctx.read_f32(&stats, 2 * t * h).expect("read").iter().step_by(2).copied().collect();
    GpuAttention { out: ctx.read_f32(&out, q.len()).expect("read"), lse, dispatches }
}

/// Split-key decoding: a few queries over a long cache run as slices of
/// `launch::SPLIT_KEYS` keys, one workgroup each, whose partial softmaxes a second pass adds.
/// Against the CPU twin: the output and the log-sum-exp, on caches that end one key into a
/// slice (2,049 keys), fill exactly two, or fit one (no split); GQA, a head wider than 128, the
/// soft cap, and a query whose first visible key (a sliding window's) leaves whole slices empty.
/// Wherever the plain kernel runs (portable; the others for shapes their blocks do not take),
/// the split path must be taken: two dispatches, not one.
#[test]
fn split_key_decoding_matches_reference() {
    use edgetune::gpu::KernelFamily;
    let mut all = vec![std::sync::Arc::new(ctx())];
    all.extend(gpus());
    for ctx in all {
        for &(t, h, kvh, hd, pos, ref starts, softcap) in &[
            (1, 9, 3, 64, 2048, vec![0], None),
            (2, 4, 2, 130, 700, vec![300, 650], Some(0.3)),
            (1, 1, 1, 8, 511, vec![0], None),
            (1, 2, 1, 16, 255, vec![0], Some(0.3)),
            (3, 2, 2, 32, 1000, vec![0, 600, 999], None),
            // Past 64 slices of 256 keys the slices grow: 63 of 320 keys here.
            (1, 2, 1, 8, 20_000, vec![0], None),
        ] {
            let case = r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: pos, softcap };
            let q = rand(t * h * hd, 41, 1.0);
            // Every other slice's keys three times as large, so that the slices' maxima differ
            // and the combining pass must rescale them to the common one.
            let mut k = rand((pos + t) * kvh * hd, 42, 1.0);
            for (j, row) in k.chunks_mut(kvh * hd).enumerate() {
                if (j / launch::SPLIT_KEYS) % 2 == 1 {
                    row.iter_mut().for_each(|x| *x *= 3.0);
                }
            }
            let v = rand((pos + t) * kvh * hd, 43, 1.0);
            let want = r::attention_forward(&q, &k, &v, starts, case);
            let scale = 1.0 / (hd as f32).sqrt();
            // The log-sum-exp of each query's scaled (and capped) scores, in f64.
            let mut want_lse = vec![];
            for (i, &first) in starts.iter().enumerate() {
                for head in 0..h {
                    let (qv, kh) = (&q[(i * h + head) * hd..][..hd], head / (h / kvh));
                    let scores: Vec<f64> = (first..=pos + i)
                        .map(|j| {
                            let kv = &k[(j * kvh + kh) * hd..][..hd];
                            f64::from(case.capped(qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale))
                        })
                        .collect();
                    let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    want_lse.push((mx + scores.iter().map(|s| (s - mx).exp()).sum::<f64>().ln()) as f32);
                }
            }
            let got = gpu_attention(&ctx, [&q, &k, &v], starts, case);
            let family = ctx.report.kernels.attention;
            // Which families fall back to the plain kernel: simd8 for a head it cannot unroll
            // (not a multiple of 4), tile128 and coop16 for one query (heads of up to 256 dims
            // for both).
            let plain = match family {
                KernelFamily::Simd8 => !(hd % 4 == 0 && hd <= 256),
                KernelFamily::Tile128 | KernelFamily::Coop16 => t == 1,
                _ => true,
            };
            let s = attention_shape(t, case);
            let split = plain && launch::key_splits(&ctx, s) > 1;
            let what =
                format!("{family} attention t{t} h{h}/{kvh} hd{hd} keys {} from {starts:?} cap {softcap:?}", pos + t);
            assert_eq!(got.dispatches, if split { 2 } else { 1 }, "{what}: dispatches");
            assert_eq!(launch::key_splits(&ctx, s) > 1, pos + t > launch::SPLIT_KEYS, "{what}: slices");
            assert!(launch::key_splits(&ctx, s) <= launch::MAX_KEY_SPLITS, "{what}: slices");
            assert_close(&what, &got.out, &want, 1e-4, 1e-5);
            assert_close(&format!("{what}: log-sum-exp"), &got.lse, &want_lse, 1e-5, 1e-5);
        }
    }
}

/// Attention of rows that are each one query of its own sequence, every sequence's keys in one
/// pool (decoding several sequences at once): against the CPU twin, in every family, one
/// dispatch for all rows (simd8's kernel where it takes the head, 8 rows a workgroup, or the
/// plain kernel), the plain kernel's two (split keys, counted from each row's first key) where
/// a row sees more than a slice, GQA, a head of 130 dims with the soft cap, a sliding
/// window's first key inside a slot, and a row of no keys, whose output and statistics are
/// left as they were.
#[test]
fn attention_over_rows_of_their_own_sequences_matches_reference() {
    let mut all = vec![std::sync::Arc::new(ctx())];
    all.extend(gpus());
    let slot = 2100;
    for ctx in all {
        for &(h, kvh, hd, softcap, ref ranges) in &[
            (4, 2, 64, None, vec![(0, 5), (slot + 40, slot + 250), (2 * slot, 2 * slot + 1)]),
            (
                4,
                2,
                64,
                None,
                vec![(0, 5), (slot, slot + 600), (2 * slot + 7, 2 * slot + 7), (3 * slot + 50, 3 * slot + 2099)],
            ),
            (2, 1, 130, Some(0.3), vec![(slot + 3, slot + 300), (0, 257), (3 * slot, 3 * slot)]),
            // Ten rows of 8-dim heads (two of simd8's 8-row workgroups), in no order, the
            // second workgroup's first row with no keys.
            (
                3,
                3,
                8,
                Some(0.3),
                (0..10).map(|i| ((9 - i) * 400, (9 - i) * 400 + if i == 8 { 0 } else { 3 + 37 * i })).collect(),
            ),
        ] {
            let case = r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: 0, softcap };
            let t = ranges.len();
            let q = rand(t * h * hd, 51, 1.0);
            let (k, v) = (rand(4 * slot * kvh * hd, 52, 1.0), rand(4 * slot * kvh * hd, 53, 1.0));
            let untouched = 7.0;
            let mut want = vec![untouched; q.len()];
            r::attention_rows_forward(&q, &k, &v, ranges, case, &mut want);
            let table: Vec<u32> = ranges.iter().flat_map(|&(a, b)| [a as u32, b as u32]).collect();
            let (qb, kb, vb) = (ctx.storage_from("q", &q), ctx.storage_from("k", &k), ctx.storage_from("v", &v));
            let ks = ctx.storage_from("key ranges", &table);
            let out = ctx.storage_from("o", &vec![untouched; q.len()]);
            let stats = ctx.storage_from("stats", &vec![untouched; 2 * t * h]);
            let most = ranges.iter().map(|&(a, b)| b - a).max().unwrap_or(0);
            let all_keys = ranges.iter().map(|&(a, b)| b - a).sum();
            let dispatches = run(&ctx, |enc| {
                let io = launch::AttentionIo { q: &qb, k: &kb, v: &vb, key_start: &ks, out: &out, stats: &stats };
                launch::attention_rows_forward(&ctx, enc, io, attention_shape(t, case), (most, all_keys))
            });
            let what =
                format!("{} rows attention h{h}/{kvh} hd{hd} cap {softcap:?} {ranges:?}", ctx.report.kernels.attention);
            // simd8 takes every head that is a multiple of 4 dims, unsplit; the plain kernel the rest.
            let simd8 = ctx.report.kernels.attention == edgetune::gpu::KernelFamily::Simd8 && hd % 4 == 0;
            let split = !simd8 && most > launch::SPLIT_KEYS && t * h < ctx.split_keys_below();
            assert_eq!(dispatches, if split { 2 } else { 1 }, "{what}: dispatches");
            assert_close(&what, &ctx.read_f32(&out, q.len()).expect("read"), &want, 1e-4, 1e-5);
            let stats = ctx.read_f32(&stats, 2 * t * h).expect("read");
            for (i, &(a, b)) in ranges.iter().enumerate() {
                let kept = stats[2 * i * h..2 * (i + 1) * h].iter().all(|&x| x == untouched);
                assert_eq!(kept, a == b, "{what}: row {i}'s statistics");
            }
        }
    }
}

/// A pass's keys and values written into a KV cache (`kv_write.wgsl`) against the CPU twin: a
/// sequence's tokens at positions from its first, and rows of their own sequences each at the
/// end of its key range less one, a row of no keys not written; positions wider than a
/// workgroup's 256 threads, and the rest of the cache left as it was.
#[test]
fn kv_write_matches_reference() {
    let ctx = ctx();
    for (width, ranged) in [(24, false), (300, false), (24, true), (300, true)] {
        let (positions, rows, first) = (40, 4, 5);
        let (k, v) = (rand(rows * width, 61, 1.0), rand(rows * width, 62, 1.0));
        let (mut want_k, mut want_v) = (rand(positions * width, 63, 1.0), rand(positions * width, 64, 1.0));
        let (k_cache, v_cache) = (ctx.storage_from("k cache", &want_k), ctx.storage_from("v cache", &want_v));
        // Rows 0, 1 and 3 end their ranges at 9, 30 and 40 (row 2 has none).
        let ranges: Vec<u32> = vec![2, 9, 12, 30, 17, 17, 39, 40];
        let table = ctx.storage_from("ranges", &ranges);
        let (at, positions_of): (_, Vec<Option<usize>>) = if ranged {
            (
                launch::KvAt::RangeEnds(&table),
                ranges.chunks(2).map(|r| (r[0] < r[1]).then(|| r[1] as usize - 1)).collect(),
            )
        } else {
            (launch::KvAt::From(first), (0..rows).map(|i| Some(first + i)).collect())
        };
        r::kv_write(&k, width, &positions_of, &mut want_k);
        r::kv_write(&v, width, &positions_of, &mut want_v);
        let (kb, vb) = (ctx.storage_from("k", &k), ctx.storage_from("v", &v));
        let dispatches = run(&ctx, |enc| {
            let w = launch::KvWrite { k: &kb, v: &vb, k_cache: &k_cache, v_cache: &v_cache, n_rows: rows, width, at };
            launch::kv_write(&ctx, enc, w)
        });
        assert_eq!(dispatches, 1);
        let what = format!("kv_write width {width} at {positions_of:?}");
        // Moved, not computed: exact.
        assert_close(
            &format!("{what}: keys"),
            &ctx.read_f32(&k_cache, positions * width).expect("read"),
            &want_k,
            0.0,
            0.0,
        );
        assert_close(
            &format!("{what}: values"),
            &ctx.read_f32(&v_cache, positions * width).expect("read"),
            &want_v,
            0.0,
            0.0,
        );
    }
}

/// Which attention kernels each family runs, forward and backward, for heads of 6 to 256 dims
/// (5 queries, no GQA): simd8 its own unrolled kernels for every head of up to 256 dims that is
/// a multiple of 4 (the smallest of the variants for 64, 128 and 256 that holds it), the tiled
/// families their 64-query blocks, and the rest the plain kernels. Their results are the other
/// attention tests' concern; this one fails where a head falls back unseen.
#[test]
fn each_family_runs_its_own_attention_kernels_for_heads_of_up_to_256_dims() {
    use edgetune::gpu::{KernelFamily, Timer};
    for ctx in common::fresh_gpus() {
        for hd in [6, 8, 64, 68, 128, 130, 200, 254, 256] {
            let (t, h) = (5, 2);
            let case = r::AttentionCase { n_heads: h, n_kv_heads: h, head_dim: hd, pos_offset: 0, softcap: None };
            let n = t * h * hd;
            let [q, k, v, o, dout, dq, dk, dv] =
                ["q", "k", "v", "o", "dout", "dq", "dk", "dv"].map(|name| ctx.storage_from(name, &rand(n, 51, 1.0)));
            let (starts, stats) = (ctx.storage_from("key start", &[0u32; 5]), ctx.storage_zeroed("stats", 2 * t * h));
            ctx.start_profiling(Timer::WallClock);
            run(&ctx, |enc| {
                let fwd = launch::AttentionIo { q: &q, k: &k, v: &v, key_start: &starts, out: &o, stats: &stats };
                launch::attention_forward(&ctx, enc, fwd, attention_shape(t, case))?;
                let grads = launch::AttentionGrads { fwd, dout: &dout, dq: &dq, dk: &dk, dv: &dv };
                launch::attention_backward(&ctx, enc, grads, attention_shape(t, case))
            });
            let ran: Vec<&str> = ctx.stop_profiling().expect("profile").iter().map(|(name, _)| *name).collect();
            let family = ctx.report.kernels.attention;
            let suffix = match (family, hd % 4 == 0, hd) {
                (KernelFamily::Simd8, true, ..=64) => "_simd8.hd64",
                (KernelFamily::Simd8, true, ..=128) => "_simd8",
                (KernelFamily::Simd8, true, ..=256) => "_simd8.hd256",
                (KernelFamily::Tile128, ..) if ctx.report.subgroups => "_t128",
                (KernelFamily::Tile128, ..) => "_t128.shared",
                _ => "",
            };
            let mut want: Vec<String> = ["attention", "attention_backward_q", "attention_backward_kv"]
                .iter()
                .map(|k| format!("{k}{suffix}"))
                .collect();
            let mut ran: Vec<String> = ran.iter().map(|name| name.to_string()).collect();
            want.sort();
            ran.sort();
            assert_eq!(ran, want, "{} ({family} attention), heads of {hd} dims", ctx.report.kernels.family);
        }
    }
}

#[test]
fn cross_entropy_matches_reference() {
    let ctx = ctx();
    let (rows, vocab) = (5, 1000);
    let logits = rand(rows * vocab, 41, 8.0);
    let targets = vec![3u32, 999, u32::MAX, 0, 512];
    let (lb, tb) = (ctx.storage_from("logits", &logits), ctx.storage_from("targets", &targets));
    let out = ctx.storage_zeroed("loss", rows);
    run(&ctx, |enc| {
        launch::cross_entropy_forward(
            &ctx,
            enc,
            launch::CrossEntropy { logits: &lb, targets: &tb, loss: &out, n_rows: rows, vocab, softcap: None },
        )
    });
    assert_close(
        "cross_entropy",
        &ctx.read_f32(&out, rows).expect("read"),
        &r::cross_entropy_forward(&logits, &targets, vocab),
        1e-5,
        1e-5,
    );
    // Gemma 2's final soft cap, in place, over more values than one dispatch row (65,535
    // workgroups of 256), at a cap the logits pass (4: they reach 8), and 30, Gemma 2's.
    // Backends compute tanh through exp, which near 0 keeps a few ulps of 1 in absolute
    // error, not relative (lavapipe: 1.6e-7), so the capped value is held to 4 ulps of 1 times
    // the cap.
    let big = rand(65_535 * 256 + 1000, 42, 8.0);
    for cap in [4.0, 30.0] {
        let b = ctx.storage_from("big", &big);
        run(&ctx, |enc| launch::logit_softcap(&ctx, enc, &b, big.len(), cap));
        let want = r::logit_softcap(&big, cap);
        let got = ctx.read_f32(&b, big.len()).expect("read");
        assert_close(&format!("logit_softcap {cap}"), &got, &want, 1e-6, 4.0 * f32::EPSILON * cap);
    }
    let b = ctx.storage_from("big", &big[..4]);
    for bad in [0.0, -1.0, f32::NAN] {
        let mut enc = ctx.encoder();
        assert!(launch::logit_softcap(&ctx, &mut enc, &b, 4, bad).is_err(), "cap {bad}");
    }
}

#[test]
fn f16_tables_match_reference_on_their_rounded_values() {
    let ctx = ctx();
    let to_f16 = |v: &[f32]| -> (Vec<half::f16>, Vec<f32>) {
        let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let back = h.iter().map(|x| x.to_f32()).collect();
        (h, back)
    };
    for ctx in gpus() {
        for &(m, n, k) in &[(1, 9, 2), (5, 70, 66), (4, 33, 130), (67, 65, 34), (40, 65, 72), (1, 40, 136)] {
            let x = rand(m * k, 51, 1.0);
            let (wh, w) = to_f16(&rand(n * k, 52, 0.5));
            let want = r::matmul_forward(&x, &w, None, m, n, k);
            let (xb, wb) = (ctx.storage_from("x", &x), ctx.storage_from("w", &wh));
            check_matmul(&ctx, "matmul_f16", (&xb, launch::Weight::F16(&wb)), (&x, &w), None, &want, (m, n, k));
        }
    }
    // Odd row length: pairs straddle rows of the table, which the gather must handle.
    let (vocab, dim) = (11, 7);
    let (th, table) = to_f16(&rand(vocab * dim, 53, 1.0));
    let ids: Vec<u32> = vec![10, 0, 3, 3, 7];
    let idb = ctx.storage_from("ids", &ids);
    let out = ctx.storage_zeroed("out", ids.len() * dim);
    let tb = ctx.storage_from("table", &th);
    run(&ctx, |enc| {
        launch::embedding_forward(
            &ctx,
            enc,
            launch::Embedding {
                ids: &idb,
                table: launch::Rows::F16(&tb),
                out: &out,
                n_tokens: ids.len(),
                dim,
                row_start: 0,
                row_count: vocab,
                scale: 1.0,
            },
        )
    });
    assert_close(
        "embedding_f16",
        &ctx.read_f32(&out, ids.len() * dim).expect("read"),
        &r::embedding_forward(&table, dim, &ids),
        0.0,
        0.0,
    );
}

#[test]
fn an_adapter_that_is_not_there_is_a_clear_error() {
    let e = GpuContext::new(&GpuOptions { adapter: Some("no-such-gpu-xyz".into()), ..Default::default() })
        .expect_err("no such adapter");
    let msg = e.to_string();
    assert!(msg.contains("no GPU adapter found") && msg.contains("no-such-gpu-xyz"), "{msg}");
    assert!(msg.contains("mesa-vulkan-drivers") && msg.contains("adapters present"), "{msg}");
}

#[test]
fn adamw_matches_reference_over_several_steps() {
    let ctx = ctx();
    let n = 1000;
    let mut p = rand(n, 61, 1.0);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (pb, mb, vb) = (ctx.storage_from("p", &p), ctx.storage_from("m", &m), ctx.storage_from("v", &v));
    // The update count lives on the GPU: each step reads its own bias corrections from the
    // table by it, and counts itself.
    let applied = ctx.storage_from("applied", &[0u32]);
    let bias = ctx.storage_from("bias", &launch::adamw_bias_table(0.9, 0.999, 8));
    let skip = ctx.storage_zeroed("skip", 1);
    for step in 1..=5u32 {
        let g = rand(n, 70 + u64::from(step), 0.1);
        let gb = ctx.storage_from("g", &g);
        let s = launch::AdamwStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_scale: 0.5,
            max_grad_norm: 1.0,
        };
        let (partials, norm) =
            (ctx.storage_zeroed("partials", launch::grad_norm_groups(n)), ctx.storage_zeroed("norm", 1));
        run(&ctx, |enc| {
            launch::grad_norm(&ctx, enc, &gb, &partials, &norm, n)?;
            let b = launch::AdamwBuffers {
                param: &pb,
                grad: &gb,
                m: &mb,
                v: &vb,
                norm: &norm,
                applied: &applied,
                bias: &bias,
                skip: &skip,
            };
            launch::adamw_step(&ctx, enc, b, n, s)
        });
        assert_eq!(ctx.read_f32(&applied, 1).expect("read")[0].to_bits(), step, "the GPU counts the update");
        // The norm of 1000 values in [-0.1, 0.1) is about 1.8, so clipping to 1 is active.
        let gn = r::grad_norm(&g);
        assert!(gn > 1.0, "the test gradient should need clipping");
        assert_close("grad_norm", &ctx.read_f32(&norm, 1).expect("read"), &[gn], 1e-6, 0.0);
        let clip = r::clip_coefficient(gn, 1.0);
        r::adamw_step(&mut p, &g, &mut m, &mut v, 1e-2, (0.9, 0.999), 1e-8, 0.01, step, 0.5 * clip);
    }
    // Same f32 operations in the same order; only sqrt and division rounding may differ (1 ulp
    // each), accumulated over 5 steps of size ~lr.
    assert_close("adamw params", &ctx.read_f32(&pb, n).expect("read"), &p, 1e-6, 1e-7);
    assert_close("adamw m", &ctx.read_f32(&mb, n).expect("read"), &m, 1e-6, 1e-9);
    assert_close("adamw v", &ctx.read_f32(&vb, n).expect("read"), &v, 1e-6, 1e-12);
}

#[test]
fn grad_norm_is_exact_over_many_workgroups_and_a_non_finite_norm_skips_adamw() {
    let ctx = ctx();
    for n in [1usize, 255, 256, 257, 70_001, 300_000] {
        let g = rand(n, n as u64, 1.0);
        let gb = ctx.storage_from("g", &g);
        let (partials, norm) =
            (ctx.storage_zeroed("partials", launch::grad_norm_groups(n)), ctx.storage_zeroed("norm", 1));
        run(&ctx, |enc| launch::grad_norm(&ctx, enc, &gb, &partials, &norm, n));
        // f32 partial sums of up to n/65536 squares, then 256-way trees: relative error well
        // under 1e-5 for these sizes.
        assert_close(
            &format!("grad_norm n={n}"),
            &ctx.read_f32(&norm, 1).expect("read"),
            &[r::grad_norm(&g)],
            1e-5,
            0.0,
        );
    }
    let n = 10;
    let p = rand(n, 5, 1.0);
    let mut g = rand(n, 6, 1.0);
    g[3] = f32::NAN;
    let (pb, gb, mb, vb) =
        (ctx.storage_from("p", &p), ctx.storage_from("g", &g), ctx.storage_zeroed("m", n), ctx.storage_zeroed("v", n));
    let (partials, norm) = (ctx.storage_zeroed("partials", 1), ctx.storage_zeroed("norm", 1));
    let s = launch::AdamwStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 1.0,
        max_grad_norm: 1.0,
    };
    let (applied, bias) = (ctx.storage_from("applied", &[3u32]), ctx.storage_from("bias", &[0.5f32, 0.5]));
    let skip = ctx.storage_zeroed("skip", 1);
    let b = launch::AdamwBuffers {
        param: &pb,
        grad: &gb,
        m: &mb,
        v: &vb,
        norm: &norm,
        applied: &applied,
        bias: &bias,
        skip: &skip,
    };
    run(&ctx, |enc| {
        launch::grad_norm(&ctx, enc, &gb, &partials, &norm, n)?;
        launch::adamw_step(&ctx, enc, b, n, s)
    });
    assert!(ctx.read_f32(&norm, 1).expect("read")[0].is_nan(), "a NaN gradient gives a NaN norm");
    assert_eq!(ctx.read_f32(&applied, 1).expect("read")[0].to_bits(), 3, "a skipped update is not counted");
    assert_eq!(ctx.read_f32(&pb, n).expect("read"), p, "a NaN step must leave the parameters alone");
    assert_eq!(ctx.read_f32(&mb, n).expect("read"), vec![0.0; n], "and the moments");

    // A finite gradient whose step had a non-finite loss: the flag skips the update too.
    let g = rand(n, 7, 1.0);
    let gb = ctx.storage_from("g", &g);
    let check = |losses: &[f32]| {
        let lb = ctx.storage_from("losses", losses);
        run(&ctx, |enc| launch::flag_non_finite(&ctx, enc, &lb, &skip, losses.len()));
        ctx.read_f32(&skip, 1).expect("read")[0].to_bits()
    };
    assert_eq!(check(&rand(1000, 8, 5.0)), 0, "finite losses leave the flag clear");
    let mut losses = rand(1000, 9, 5.0);
    losses[777] = f32::INFINITY;
    assert_eq!(check(&losses), 1, "an infinite loss sets it");
    assert_eq!(check(&rand(3, 10, 1.0)), 1, "and finite ones later in the step leave it set");
    let b = launch::AdamwBuffers { grad: &gb, ..b };
    run(&ctx, |enc| {
        launch::grad_norm(&ctx, enc, &gb, &partials, &norm, n)?;
        launch::adamw_step(&ctx, enc, b, n, s)
    });
    assert!(ctx.read_f32(&norm, 1).expect("read")[0].is_finite());
    assert_eq!(ctx.read_f32(&applied, 1).expect("read")[0].to_bits(), 3, "the flagged update is not counted");
    assert_eq!(ctx.read_f32(&pb, n).expect("read"), p, "nor applied");
    let nan_at_end = [1.0, 2.0, f32::NAN];
    let fresh = ctx.storage_zeroed("flag", 1);
    let lb = ctx.storage_from("losses", &nan_at_end);
    run(&ctx, |enc| launch::flag_non_finite(&ctx, enc, &lb, &fresh, 3));
    assert_eq!(ctx.read_f32(&fresh, 1).expect("read")[0].to_bits(), 1, "a NaN sets it");
}

#[test]
fn dropout_matches_its_twin_bit_for_bit_and_keeps_one_minus_p() {
    let ctx = ctx();
    let n = 100_003;
    let x = rand(n, 77, 1.0);
    for (p, seed) in [(0.1f32, 1u32), (0.5, 2), (0.9, 3)] {
        let xb = ctx.storage_from("x", &x);
        run(&ctx, |enc| launch::dropout(&ctx, enc, &xb, n, p, seed));
        let got = ctx.read_f32(&xb, n).expect("read");
        let mut want = x.clone();
        r::dropout(&mut want, p, seed);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "p {p}: kernel and twin differ");
        // The kept share is binomial(n, 1 - p): within 5 standard deviations.
        let kept = got.iter().filter(|&&v| v != 0.0).count() as f64;
        let (mean, sd) = (n as f64 * f64::from(1.0 - p), (n as f64 * f64::from(p * (1.0 - p))).sqrt());
        assert!((kept - mean).abs() < 5.0 * sd, "p {p}: kept {kept}, expected {mean} ± {sd}");
        let s = 1.0 / (1.0 - p);
        assert!(got.iter().zip(&x).all(|(g, v)| *g == 0.0 || *g == v * s), "kept values are scaled by 1/(1-p)");
    }
    let xb = ctx.storage_from("x", &x);
    let mut enc = ctx.encoder();
    assert!(launch::dropout(&ctx, &mut enc, &xb, n, 1.0, 0).is_err(), "p = 1 would drop everything");
}

/// The f16 neighbour of `r` on x's side, for a value x that r does not represent exactly.
fn f16_next_toward(r: half::f16, x: f32) -> half::f16 {
    let up = x > r.to_f32();
    let positive = r.to_bits() & 0x8000 == 0;
    let bits = if up == positive { r.to_bits() + 1 } else { r.to_bits() - 1 };
    half::f16::from_bits(bits)
}

#[test]
fn f16_activation_storage_rounds_like_its_twin_and_reads_back_exactly() {
    let ctx = ctx();
    // Every binade an activation can reach, f16's subnormals and its edges, an odd count (the
    // last word holds one value), and the values a cast to f16 must not hide.
    let mut x = Vec::new();
    for (k, e) in (-30..=17).enumerate() {
        x.extend(rand(2001, 900 + k as u64, 2f32.powi(e)));
    }
    x.extend([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, -65519.9, 65520.0, 7e4, -7e4, 6e-8, -3e-8]);
    x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE]);
    assert_eq!(x.len() % 2, 1);
    let n = x.len();
    let xb = ctx.storage_from("x", &x);
    let packed = ctx.storage_zeroed("packed", n.div_ceil(2));
    let back = ctx.storage_zeroed("back", n);
    run(&ctx, |enc| {
        launch::f16_pack(&ctx, enc, &xb, &packed, n)?;
        launch::f16_unpack(&ctx, enc, &packed, &back, n)
    });
    let rounded = ctx.read_f32(&xb, n).expect("read");
    let words: Vec<u32> = ctx.read_f32(&packed, n.div_ceil(2)).expect("read").iter().map(|w| w.to_bits()).collect();
    let unpacked = ctx.read_f32(&back, n).expect("read");
    let mut want = x.clone();
    r::round_to_f16(&mut want);
    let mut not_nearest = 0;
    for i in 0..n {
        let (g, w) = (rounded[i], want[i]);
        let half = half::f16::from_bits((words[i / 2] >> (16 * (i % 2))) as u16);
        // The stored half, the value rounded in place and the value read back agree exactly.
        if w.is_nan() {
            assert!(g.is_nan() && half.is_nan() && unpacked[i].is_nan(), "x[{i}] = NaN must stay NaN");
            continue;
        }
        assert_eq!(half.to_f32().to_bits(), g.to_bits(), "x[{i}] = {:e}: stored {half} but rounded to {g:e}", x[i]);
        assert_eq!(unpacked[i].to_bits(), g.to_bits(), "x[{i}] = {:e}: read back {:e}", x[i], unpacked[i]);
        // WGSL lets a conversion that is not exact round to either neighbour; the twin rounds
        // to the nearest. Anything else (a wrong half, a lost sign, a flushed value) fails.
        // Past f16's range the kernel decides (infinity), not the conversion: no choice there.
        if g.to_bits() != w.to_bits() {
            assert!(w.is_finite(), "x[{i}] = {:e}: got {g:e}, want {w:e}", x[i]);
            let other = f16_next_toward(half::f16::from_f32(w), x[i]).to_f32();
            assert_eq!(g.to_bits(), other.to_bits(), "x[{i}] = {:e}: got {g:e}, want {w:e} (or {other:e})", x[i]);
            not_nearest += 1;
        }
    }
    eprintln!("{not_nearest} of {n} values rounded to the farther f16 neighbour");
    assert!(rounded[n - 5..n - 3] == [f32::INFINITY, f32::NEG_INFINITY], "infinities stay infinite");
    let mut enc = ctx.encoder();
    let small = ctx.storage_zeroed("small", n.div_ceil(2) - 1);
    assert!(launch::f16_pack(&ctx, &mut enc, &xb, &small, n).is_err(), "a packed buffer that is too small");
}

/// 100 launches, submitted, then 40,000 more, each with its own scale, accumulate
/// y += alpha_i * (x . w) = alpha_i: more than the 16,384 slots of the parameter ring, so it
/// wraps round while earlier launches wait on the GPU, and (the first 100 moving the
/// submissions off the ring's 256-slot grid) while some slots are not yet written. A launch
/// that read another's parameters would change the exact integer sum.
#[test]
fn kernel_parameters_survive_the_uniform_ring_wrapping_round() {
    let ctx = ctx();
    let (x, w) = (ctx.storage_from("x", &[1.0f32]), ctx.storage_from("w", &[1.0f32]));
    let y = ctx.storage_zeroed("y", 1);
    let before = ctx.counts();
    // One bind group for all of them: the parameters differ only by their dynamic offset.
    let binds = edgetune::gpu::BindGroups::new();
    let launch_all = |range: std::ops::Range<u32>| {
        let mut enc = ctx.encoder_with(&binds);
        for i in range {
            let out = launch::OutCols::whole(1).scaled((i % 7) as f32).accumulated();
            launch::matmul_forward(
                &ctx,
                &mut enc,
                launch::Matmul { x: &x, w: launch::Weight::Dense(&w), bias: None, y: &y, m: 1, n: 1, k: 1, out },
            )
            .expect("launch");
        }
        ctx.submit([enc.finish()]);
    };
    launch_all(0..100);
    launch_all(100..40_100);
    let want: u32 = (0..40_100).map(|i| i % 7).sum();
    assert_eq!(ctx.read_f32(&y, 1).expect("read")[0], want as f32);
    let used = ctx.counts() - before;
    assert_eq!(used.dispatches, 40_100);
    // A context whose cooperative-matrix self-test ran at start-up made both already.
    let made = if ctx.report.coop_self_test.is_some() { 0 } else { 2 };
    assert_eq!(used.buffers, made, "the ring, made at the first launch, and the readback's staging buffer");
    assert_eq!(used.bind_groups, 1, "one bind group, reused at every offset of the ring");
    assert_eq!(binds.len(), 1);
    assert!(used.submits > 100, "the encoder was submitted as it filled ({} submits)", used.submits);
}

/// Two encoders of one context recording at once (two models on one context, or two threads):
/// encoder A takes 1,000 parameter slots and waits unsubmitted while encoder B records 40,000
/// launches, submitted as it fills, which takes the ring round more than twice. B must not
/// write over A's slots: each sum is exact only if every launch read its own scale. Then, with
/// every encoder submitted or dropped (one dropped holding 300 slots), the ring goes round
/// again without a new buffer.
#[test]
fn an_unsubmitted_encoder_keeps_its_parameter_slots_while_another_goes_round_the_ring() {
    let ctx = ctx();
    let (x, w) = (ctx.storage_from("x", &[1.0f32]), ctx.storage_from("w", &[1.0f32]));
    let (ya, yb) = (ctx.storage_zeroed("ya", 1), ctx.storage_zeroed("yb", 1));
    let record = |enc: &mut edgetune::gpu::Encoder, y: &wgpu::Buffer, range: std::ops::Range<u32>, scale: u32| {
        for i in range {
            let out = launch::OutCols::whole(1).scaled((i % scale + 1) as f32).accumulated();
            let m = launch::Matmul { x: &x, w: launch::Weight::Dense(&w), bias: None, y, m: 1, n: 1, k: 1, out };
            launch::matmul_forward(&ctx, enc, m).expect("launch");
        }
    };
    let mut a = ctx.encoder().whole();
    record(&mut a, &ya, 0..1000, 5);
    let mut b = ctx.encoder();
    record(&mut b, &yb, 0..40_000, 7);
    ctx.submit([b.finish()]);
    ctx.submit([a.finish()]);
    let sum = |n: u32, scale: u32| (0..n).map(|i| i % scale + 1).sum::<u32>() as f32;
    assert_eq!(ctx.read_f32(&ya, 1).expect("read")[0], sum(1000, 5), "A read another launch's scale");
    assert_eq!(ctx.read_f32(&yb, 1).expect("read")[0], sum(40_000, 7));
    // An encoder dropped unsubmitted gives its slots back (its launches never run).
    let mut dropped = ctx.encoder().whole();
    record(&mut dropped, &yb, 0..300, 2);
    drop(dropped);
    let before = ctx.counts();
    let mut c = ctx.encoder();
    record(&mut c, &yb, 0..40_000, 3);
    ctx.submit([c.finish()]);
    assert_eq!(ctx.read_f32(&yb, 1).expect("read")[0], sum(40_000, 7) + sum(40_000, 3));
    assert_eq!((ctx.counts() - before).buffers, 0, "nothing held: the ring goes round, no new buffer");
}

/// Greedy decoding's argmax on the GPU against its twin and the CPU sampler, on vocabulary
/// sizes from 1 to past the first pass's 256 workgroups of 4,096, with the maximum tied
/// across workgroups (the lower index wins), NaNs (never chosen), and rows with nothing above
/// -infinity (index 0); and 1 to 5 rows side by side, each its own (`launch::argmax_rows`).
#[test]
fn argmax_matches_the_cpu_sampler() {
    let ctx = ctx();
    let greedy = edgetune::infer::GenerateOptions::default();
    let mut rng = edgetune::infer::Rng::new(0);
    for (n, case) in
        [(1, 0), (7, 0), (4096, 1), (4097, 1), (49_152, 1), (151_936, 2), (1_100_000, 1), (5000, 3), (300, 4)]
    {
        let mut x = rand(n, n as u64, 4.0);
        match case {
            // The same maximum twice, far apart (different first-pass workgroups).
            1 => {
                x[n / 3] = 9.0;
                x[n - 1] = 9.0;
            }
            // NaNs everywhere, one of them where the maximum would be.
            2 => {
                for i in (0..n).step_by(97) {
                    x[i] = f32::NAN;
                }
                x[n / 2] = 9.0;
                x[n / 2 + 1] = f32::NAN;
            }
            3 => x.fill(f32::NEG_INFINITY),
            4 => x.fill(f32::NAN),
            _ => {}
        }
        let xb = ctx.storage_from("logits", &x);
        let partials = ctx.storage_zeroed("partials", 2 * launch::argmax_groups(n));
        let out = ctx.storage_from("out", &[u32::MAX]);
        run(&ctx, |enc| launch::argmax(&ctx, enc, &xb, &partials, &out, n));
        let got = ctx.read_f32(&out, 1).expect("read")[0].to_bits();
        let want = r::argmax(&x);
        assert_eq!(got, want, "n {n}, case {case}");
        assert_eq!(want, edgetune::infer::sample(&x, &greedy, &mut rng), "the twin is the CPU sampler's greedy pick");
        if case == 1 {
            assert_eq!(got, (n / 3) as u32, "the first of two equal maxima");
        }
    }
    // Rows of logits side by side (decoding several sequences): each row's own index.
    for (n, rows) in [(7, 3), (49_152, 5), (4097, 1)] {
        let mut x = rand(n * rows, 77 + n as u64, 4.0);
        if rows > 1 {
            x[n + n / 3] = 9.0; // row 1: two equal maxima in different workgroups
            x[2 * n - 1] = 9.0;
            x[2 * n..3 * n].fill(f32::NEG_INFINITY); // row 2: nothing beats -infinity
        }
        let xb = ctx.storage_from("logits", &x);
        let partials = ctx.storage_zeroed("partials", 2 * launch::argmax_groups(n) * rows);
        let out = ctx.storage_from("out", &vec![u32::MAX; rows]);
        run(&ctx, |enc| launch::argmax_rows(&ctx, enc, (&xb, &partials, &out), n, rows));
        let got: Vec<u32> = ctx.read_f32(&out, rows).expect("read").iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = x.chunks(n).map(r::argmax).collect();
        assert_eq!(got, want, "{rows} rows of {n}");
        if rows > 1 {
            assert_eq!((got[1], got[2]), ((n / 3) as u32, 0), "{rows} rows of {n}");
        }
    }
    let small = ctx.storage_zeroed("partials", 1);
    let x = ctx.storage_zeroed("x", 10_000);
    let mut enc = ctx.encoder();
    assert!(launch::argmax(&ctx, &mut enc, &x, &small, &small, 10_000).is_err(), "partials too small");
    let (partials, out) = (ctx.storage_zeroed("partials", 2 * 3), ctx.storage_zeroed("out", 2));
    let err = launch::argmax_rows(&ctx, &mut enc, (&x, &partials, &out), 5_000, 3).expect_err("out too small");
    assert!(err.to_string().contains("3 rows of 5000 values"), "{err}");
}

/// Profiling sums every dispatch under its shader with the operations its launcher declares:
/// with timestamp queries where the adapter has them (lavapipe has), through more dispatches
/// than one query set holds, and with wall-clock time on request; results are unchanged.
#[test]
fn profiling_counts_every_dispatch_with_its_declared_cost() {
    use edgetune::gpu::Timer;
    let ctx = ctx();
    let (m, n, k) = (64, 48, 32);
    let (x, w) = (ctx.storage_from("x", &vec![1.0f32; m * k]), ctx.storage_from("w", &vec![1.0f32; n * k]));
    for (want, launches) in [(Timer::GpuTimestamps, 2500usize), (Timer::WallClock, 40)] {
        let y = ctx.storage_zeroed("y", m * n);
        let timer = ctx.start_profiling(want);
        let expected = if ctx.report.timestamp_query { want } else { Timer::WallClock };
        assert_eq!(timer, expected);
        assert_eq!(ctx.profiling(), Some(timer));
        run(&ctx, |enc| {
            dense_matmuls(&ctx, enc, (&x, &w, &y), (m, n, k), launch::OutCols::whole(n).accumulated(), launches)
        });
        let kernels = ctx.stop_profiling().expect("profile");
        assert_eq!(ctx.profiling(), None);
        let dispatches: u64 = kernels.iter().map(|(_, t)| t.dispatches).sum();
        let flops: f64 = kernels.iter().map(|(_, t)| t.flops).sum();
        let seconds: f64 = kernels.iter().map(|(_, t)| t.seconds).sum();
        assert_eq!(dispatches, launches as u64, "{timer:?}: {kernels:?}");
        assert_eq!(flops, (2 * m * n * k * launches) as f64, "2mnk per matmul");
        assert!(seconds > 0.0 && kernels.iter().all(|(_, t)| t.gflops().is_some()), "{timer:?}: {kernels:?}");
        let got = ctx.read_f32(&y, m * n).expect("read");
        assert!(got.iter().all(|&v| v == (k * launches) as f32), "{timer:?}: profiling changed the result");
    }
    assert!(ctx.stop_profiling().expect("not profiling").is_empty());
}

/// Sampling's top-k on the GPU against the CPU sampler's order (highest first by
/// `f32::total_cmp`, the lower index first among equal values): ties within and across
/// workgroups, -0.0 below +0.0, NaNs (a positive NaN above +infinity), fewer values than k;
/// and 1 to 5 rows side by side, each its own (`launch::top_k_rows`).
#[test]
fn top_k_matches_the_cpu_samplers_order() {
    let ctx = ctx();
    for (n, k, seed) in [(1, 1, 1), (3, 5, 2), (300, 64, 3), (49_152, 50, 4), (151_936, 256, 5), (10_000, 1, 6)] {
        let mut x = rand(n, seed, 8.0);
        if n > 200 {
            // Ties: the same value in many places, and the maximum twice.
            for i in (0..n).step_by(37) {
                x[i] = 7.5;
            }
            x[n / 2] = 9.0;
            x[n - 1] = 9.0;
            x[5] = -0.0;
            x[6] = 0.0;
            x[7] = f32::NAN;
            x[8] = -f32::NAN;
            x[9] = f32::INFINITY;
        }
        let xb = ctx.storage_from("logits", &x);
        let partials = ctx.storage_zeroed("partials", launch::top_k_partials(n, k));
        let out = ctx.storage_zeroed("out", 2 * k);
        run(&ctx, |enc| launch::top_k(&ctx, enc, &xb, &partials, &out, n, k));
        let words: Vec<u32> = ctx.read_f32(&out, 2 * k).expect("read").iter().map(|v| v.to_bits()).collect();
        let mut want: Vec<u32> = (0..n as u32).collect();
        want.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
        want.truncate(k);
        let got_ids: Vec<u32> = words.chunks(2).map(|p| p[1]).filter(|&i| i != u32::MAX).collect();
        assert_eq!(got_ids, want, "n {n}, k {k}");
        for p in words.chunks(2).filter(|p| p[1] != u32::MAX) {
            assert_eq!(p[0], x[p[1] as usize].to_bits(), "n {n}, k {k}: the value comes back bit for bit");
        }
        assert_eq!(words.chunks(2).filter(|p| p[1] == u32::MAX).count(), k.saturating_sub(n), "missing ones marked");
    }
    // Rows of logits side by side (sampling several sequences): each row's own candidates,
    // indices within the row, including a row whose values all tie and one past a workgroup.
    for (n, k, rows) in [(7, 3, 3), (49_152, 40, 4), (5000, 256, 2), (300, 1, 5)] {
        let mut x = rand(n * rows, 91 + n as u64, 8.0);
        x[n..2 * n].fill(1.5);
        x[n * rows - 1] = 99.0;
        let xb = ctx.storage_from("logits", &x);
        let partials = ctx.storage_zeroed("partials", launch::top_k_partials(n, k) * rows);
        let out = ctx.storage_from("out", &vec![0.5f32; 2 * k * rows]);
        run(&ctx, |enc| launch::top_k_rows(&ctx, enc, (&xb, &partials, &out), (n, k), rows));
        let words: Vec<u32> = ctx.read_f32(&out, 2 * k * rows).expect("read").iter().map(|v| v.to_bits()).collect();
        for (r, (row, got)) in x.chunks(n).zip(words.chunks(2 * k)).enumerate() {
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            want.truncate(k);
            let pairs: Vec<(u32, u32)> = got.chunks(2).filter(|p| p[1] != u32::MAX).map(|p| (p[1], p[0])).collect();
            let want: Vec<(u32, u32)> = want.iter().map(|&i| (i, row[i as usize].to_bits())).collect();
            assert_eq!(pairs, want, "row {r} of {rows} rows of {n}, k {k}");
        }
    }
    let x = ctx.storage_zeroed("x", 100);
    let mut enc = ctx.encoder();
    let e = launch::top_k_rows(&ctx, &mut enc, (&x, &x, &x), (50, 4), 3).expect_err("x too small for 3 rows");
    assert!(e.to_string().contains("3 rows"), "{e}");
    assert!(launch::top_k(&ctx, &mut enc, &x, &x, &x, 100, 0).is_err(), "k = 0");
    assert!(launch::top_k(&ctx, &mut enc, &x, &x, &x, 100, launch::MAX_TOP_K + 1).is_err(), "k too large");
    let small = ctx.storage_zeroed("small", 1);
    assert!(launch::top_k(&ctx, &mut enc, &x, &small, &x, 100, 10).is_err(), "partials too small");
}

/// A GPU that does not finish in time is an error naming the setting, never a hang: with a
/// one-microsecond limit, the readback after 4 GFLOP of matmuls (256 GFLOP on a GPU, which
/// takes a fast one well over a millisecond; 4 finished on an H200 before the wait began)
/// cannot see them finish. Lavapipe may run the work before the wait begins (it did in release
/// builds here, not in debug ones), so on a CPU adapter a correct readback is accepted too.
#[test]
fn a_gpu_that_does_not_finish_in_time_is_an_error() {
    let opts = GpuOptions { gpu_timeout: Some(std::time::Duration::from_micros(1)), ..Default::default() };
    let ctx = GpuContext::new(&opts).expect("adapter");
    let may_finish_in_submit = ctx.report.device_type == "Cpu";
    let (m, n, k) = (512, 2048, 2048);
    let (x, w, y) = (ctx.storage_zeroed("x", m * k), ctx.storage_zeroed("w", n * k), ctx.storage_zeroed("y", m * n));
    let repeats = if may_finish_in_submit { 1 } else { 64 };
    run(&ctx, |enc| dense_matmuls(&ctx, enc, (&x, &w, &y), (m, n, k), launch::OutCols::whole(n), repeats));
    match ctx.read_f32(&y, 4) {
        Ok(v) => assert!(may_finish_in_submit && v == [0.0; 4], "a 1 us wait saw a 4-GFLOP matmul finish: {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("did not finish") && msg.contains("EDGETUNE_GPU_TIMEOUT_S"), "{msg}");
        }
    }
}

/// The driver running out of memory is an error that names what was being allocated and the
/// planned bytes, never a panic or an abort, and the context stays usable. A real driver's
/// failure, not a simulated one: the test runs itself again in a child process whose address
/// space `prlimit` caps at what it already maps plus 512 MiB, so lavapipe's allocation of a
/// 1.5 GiB buffer (its device memory is the process's) fails inside the driver, while the
/// library's own small allocations still fit.
#[test]
fn the_driver_running_out_of_memory_is_an_error_with_the_planned_bytes() {
    const CHILD: &str = "EDGETUNE_TEST_OOM_CHILD";
    const NAME: &str = "the_driver_running_out_of_memory_is_an_error_with_the_planned_bytes";
    let planned: u64 = 3 << 29;
    let ctx = ctx();
    if ctx.report.device_type != "Cpu" {
        // A GPU's memory is its own: an address-space cap does not reach it.
        eprintln!("not run: needs an adapter whose memory is the process's (lavapipe), not {}", ctx.report.name);
        return;
    }
    if std::env::var_os(CHILD).is_none() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("the child runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "the child failed ({}):\n{text}", out.status);
        assert!(text.contains("out of GPU memory allocating a test's buffer (1536 MiB planned)"), "{text}");
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let mapped_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize");
    let cap = mapped_kib * 1024 + (512 << 20);
    let set = std::process::Command::new("prlimit")
        .args([format!("--pid={}", std::process::id()), format!("--as={cap}")])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(set.success(), "prlimit failed");
    let e = ctx
        .allocating("a test's buffer", planned, "lower the test's ambitions", || {
            Ok(ctx.storage_zeroed("1.5 GiB", (planned / 4) as usize))
        })
        .expect_err("1.5 GiB past a 512 MiB headroom");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(&e, edgetune::Error::OutOfMemory { planned_bytes, .. } if *planned_bytes == planned), "{e:?}");
    assert!(msg.contains("the driver says") && msg.contains("lower the test's ambitions"), "{msg}");
    // Nothing is left pending, and the context still computes.
    ctx.check().expect("no error left over");
    let small = ctx.storage_from("small", &[1.0f32, 2.0, 3.0, 4.0]);
    assert_eq!(ctx.read_f32(&small, 4).expect("read back"), [1.0, 2.0, 3.0, 4.0]);
}

/// The kernel log (`GpuOptions::kernel_log`, `EDGETUNE_KERNEL_LOG`; what `scripts/test.sh`
/// holds to every kernel) names a kernel when a context first dispatches it, once, and not when
/// it is only compiled; with the cooperative-matrix kernels emulated, the start-up self-test's
/// kernels are named as the emulated twins that ran, never as the matrix-unit kernels.
#[test]
fn the_kernel_log_names_what_was_dispatched_once_and_not_what_was_compiled() {
    use edgetune::gpu::KernelFamily;
    let dir = std::env::temp_dir().join(format!("edgetune-kernel-log-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let log = dir.join("plain.txt");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let ctx = GpuContext::new(&GpuOptions { kernel_log: Some(log.clone()), ..Default::default() }).expect("adapter");
    ctx.pipeline(&shaders::LOGIT_SOFTCAP, &[]).expect("compiles");
    assert_eq!(read(&log), "", "compiling is not dispatching");
    let (x, y) = (ctx.storage_from("x", &rand(10, 1, 1.0)), ctx.storage_from("y", &rand(10, 2, 1.0)));
    for _ in 0..3 {
        run(&ctx, |enc| launch::add_forward(&ctx, enc, &x, &y, 10));
    }
    run(&ctx, |enc| launch::logit_softcap(&ctx, enc, &y, 10, 2.0));
    assert_eq!(read(&log), "add\nlogit_softcap\n");

    let log = dir.join("coop16.txt");
    let opts = GpuOptions {
        kernels: Some(KernelFamily::Coop16),
        emulate_coop: true,
        kernel_log: Some(log.clone()),
        ..Default::default()
    };
    let ctx = GpuContext::new(&opts).expect("coop16 emulated (lavapipe has shader-f16)");
    assert!(ctx.report.coop_emulated, "{}", ctx.report);
    let said = read(&log);
    let names: Vec<&str> = said.lines().collect();
    assert!(names.contains(&"matmul_nf4_t128.coop16.emulated"), "the self-test ran: {said}");
    assert!(names.iter().all(|n| !n.contains(".coop16") || n.ends_with(".emulated")), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adapters of the given ranks one after another in one buffer from element 5, then junk, as a
/// resident set holds them: the buffer and each adapter's slices, scales 0.5, 1.5, ...
fn resident_adapters(ranks: &[usize], (n_in, n_out): (usize, usize), seed: u64) -> (Vec<f32>, Vec<r::LoraRow>) {
    let mut w = rand(5, seed, 1.0);
    let mut slices = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        let a = w.len();
        w.extend(rand(rank * n_in, seed + 1 + i as u64, 0.5));
        let b = w.len();
        w.extend(rand(n_out * rank, seed + 11 + i as u64, 0.5));
        slices.push(r::LoraRow { a, b, rank, scale: 0.5 + i as f32 });
    }
    w.extend(rand(9, seed + 30, 1.0));
    (w, slices)
}

/// The table that `lora_rows.wgsl` reads: junk entries before `first`, then each module's rows.
fn rows_table(first: usize, modules: &[&[r::LoraRow]]) -> Vec<u32> {
    let mut table = vec![u32::MAX; 4 * first];
    for e in modules.iter().flat_map(|m| m.iter()) {
        table.extend([e.a as u32, e.b as u32, e.rank as u32, e.scale.to_bits()]);
    }
    table
}

/// Gathered LoRA's A products (`launch::lora_rows_a`): every row of a batch through its own
/// adapter's A, for one to three modules that read the same x in one dispatch, their entries
/// one after another from the middle of the table and their x A^T side by side in h. Ranks 1, 8,
/// 16 and 64 beside rows without an adapter (rank 0), 1 to 2,049 rows, inputs that are no
/// multiple of the kernel's 64 lanes, h full of NaN before: every value past a row's rank is
/// written 0. Against the twin and both against the sums in f64: an f32 dot product of n terms
/// is within n u sum |x a| of its exact value (u = 2^-24), twice that between kernel and twin.
/// Refused: no rank, an h, x or table too short.
#[test]
fn gathered_lora_a_products_give_each_row_its_own_adapter() {
    let ctx = ctx();
    let u = f64::from(f32::EPSILON) / 2.0;
    // (rows, n_in, modules)
    for (case, &(rows, n_in, modules)) in [(1, 40, 1), (5, 96, 3), (9, 576, 2), (2049, 24, 3)].iter().enumerate() {
        let seed = 1300 + 10 * case as u64;
        let (w, slices) = resident_adapters(&[1, 8, 0, 16, 64], (n_in, 3), seed);
        let row_of: Vec<Vec<r::LoraRow>> =
            (0..modules).map(|i| (0..rows).map(|t| slices[(t * 3 + case + i) % slices.len()]).collect()).collect();
        let module_rows: Vec<&[r::LoraRow]> = row_of.iter().map(|m| m.as_slice()).collect();
        let width = row_of.iter().flatten().map(|e| e.rank).max().unwrap_or(1).max(1);
        let table_row = 3;
        let table = rows_table(table_row, &module_rows);
        let x = rand(rows * n_in, seed + 40, 1.0);
        let stride = modules * width;
        let (xb, wb, tb, hb) = (
            ctx.storage_from("x", &x),
            ctx.storage_from("adapters", &w),
            ctx.storage_from("table", &table),
            ctx.storage_from("h", &vec![f32::NAN; rows * stride]),
        );
        let adapters = launch::RowsAdapters { w: &wb, table: &tb, table_row, width };
        let a = launch::LoraRowsA { x: &xb, adapters, modules, h: &hb, rows, n_in };
        assert_eq!(run(&ctx, |enc| launch::lora_rows_a(&ctx, enc, a)), 1, "one dispatch for the modules");
        let got = ctx.read_f32(&hb, rows * stride).expect("readback");
        let twin = r::lora_rows_a(&x, &w, &module_rows, (n_in, width));
        let what = format!("{rows} rows of {n_in}, {modules} modules");
        for (i, module) in row_of.iter().enumerate() {
            for (t, e) in module.iter().enumerate() {
                let xt = &x[t * n_in..(t + 1) * n_in];
                for j in 0..width {
                    let at = t * stride + i * width + j;
                    if j >= e.rank {
                        assert_eq!(got[at].to_bits(), 0, "{what}: module {i} row {t} (rank {}) column {j}", e.rank);
                        continue;
                    }
                    let a = &w[e.a + j * n_in..e.a + (j + 1) * n_in];
                    let exact: f64 = xt.iter().zip(a).map(|(x, a)| f64::from(*x) * f64::from(*a)).sum();
                    let mass: f64 = xt.iter().zip(a).map(|(x, a)| f64::from((x * a).abs())).sum();
                    let bound = n_in as f64 * u * mass;
                    let (g, tw) = (f64::from(got[at]), f64::from(twin[at]));
                    assert!((g - exact).abs() <= bound, "{what}: module {i} row {t} column {j}: {g} vs {exact}");
                    assert!((tw - exact).abs() <= bound, "{what}: the twin's module {i} row {t} column {j}");
                    assert!((g - tw).abs() <= 2.0 * bound, "{what}: module {i} row {t} column {j}: {g} vs twin {tw}");
                }
            }
        }
        let mut enc = ctx.encoder();
        // Buffers are padded to 16 bytes: one a padded block shorter than asked.
        let short = |need: usize| ctx.storage_zeroed("short", (need - 1) / 4 * 4);
        let (short_h, short_x) = (short(rows * stride), short(rows * n_in));
        let mut refused = vec![
            (launch::LoraRowsA { adapters: launch::RowsAdapters { width: 0, ..adapters }, ..a }, "none may be 0"),
            (launch::LoraRowsA { x: &short_x, ..a }, "x holds"),
            (launch::LoraRowsA { adapters: launch::RowsAdapters { table_row: 4, ..adapters }, ..a }, "table holds"),
        ];
        if rows * stride > 4 {
            refused.push((launch::LoraRowsA { h: &short_h, ..a }, "h holds"));
        }
        for (a, why) in refused {
            let err = launch::lora_rows_a(&ctx, &mut enc, a).expect_err(why);
            assert!(err.to_string().contains(why), "{what}: {err}");
        }
    }
}

/// Rows that each carry their own adapter add its B product to the base product over every row
/// (`launch::matmul_rows_lora_forward`): y = x W^T (+ bias) (+ y) + scale_t h_t B_t^T, each row's
/// B and scale from its table entry, its x A^T read at a row stride and first column of a wider
/// h whose values past the row's rank are junk (never read as the row's). In every family and
/// weight format, against the twin's base product plus the B products summed in f64: M from 2
/// to 33, K of 40 to 320 (not a multiple of the tiles' step), slot widths of 1 to 64 with ranks
/// 0 to the width. The simd8 kernels add the B products in their epilogue, the tiled cores as
/// more of the reduction, M slots of the width, each zero but for its row, where M * width is
/// at most K (one dispatch, as the product alone), else a second dispatch adds them. The bound is
/// `wanted_with_slack`'s over K + width products (zeros add no rounding), the bias and the
/// accumulated value; coop16's f16 operands add `f16_slack` over the whole reduction. Refused:
/// one row, alpha other than 1, a block of y's columns, an h or table too short.
#[test]
fn a_many_row_product_with_each_rows_own_lora_b_matches_the_two_products() {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        // (rows, outputs, reduction, slot width, h's first column, h's row stride)
        let shapes = [
            (2, 37, 40, 1, 0, 1),
            (9, 70, 96, 16, 16, 48),
            (5, 37, 320, 64, 0, 64),
            (33, 9, 256, 8, 8, 24),
            (17, 37, 200, 8, 0, 8),
        ];
        for (i, &(m, n, k, width, h_col, h_stride)) in shapes.iter().enumerate() {
            let seed = 1500 + 10 * i as u64;
            let ranks = [1, width, 0, (width / 2).max(1)];
            let (lw, slices) = resident_adapters(&ranks, (k, n), seed);
            let rows: Vec<r::LoraRow> = (0..m).map(|t| slices[(t + i) % slices.len()]).collect();
            let table_row = 2;
            let table = rows_table(table_row, &[&rows]);
            let x = rand(m * k, seed + 40, 1.0);
            let w = rand(n * k, seed + 41, 0.3);
            let bias = rand(n, seed + 42, 0.5);
            let y0 = rand(m * n, seed + 43, 2.0);
            let h = rand(m * h_stride, seed + 44, 1.0);
            let h_at = |t: usize, j: usize| h[t * h_stride + h_col + j];
            let b_at = |e: &r::LoraRow, c: usize, j: usize| if j < e.rank { lw[e.b + c * e.rank + j] } else { 0.0 };
            let (xb, bb, hb, wb, tb) = (
                ctx.storage_from("x", &x),
                ctx.storage_from("bias", &bias),
                ctx.storage_from("h", &h),
                ctx.storage_from("adapters", &lw),
                ctx.storage_from("table", &table),
            );
            let adapters = launch::RowsAdapters { w: &wb, table: &tb, table_row, width };
            let b = launch::RowsB { adapters, h: &hb, h_col, h_stride };
            let (wide_h, wide_b) = (ctx.storage_zeroed("h", m * m * width), ctx.storage_zeroed("B", n * m * width));
            let mut twin_b = vec![0.0; m * n];
            r::lora_rows_b(&h, (h_col, h_stride), &lw, &rows, n, &mut twin_b);
            let on_gpu = Formats::new(&ctx, &w, (n, k), seed, 32);
            for (label, weight, wd, mass) in on_gpu.list() {
                let y = ctx.storage_from("y", &y0);
                let out = launch::OutCols::whole(n).accumulated();
                let mm = launch::Matmul { x: &xb, w: weight, bias: Some(&bb), y: &y, m, n, k, out };
                let dispatches = run(&ctx, |enc| launch::matmul_rows_lora_forward(&ctx, enc, mm, b));
                // What the product records alone, and with one adapter's B product as wide as
                // the rows' slots (a reduction as long as the fused one: split alike).
                let scratch = ctx.storage_zeroed("y", m * n);
                let alone = run(&ctx, |enc| launch::matmul_forward(&ctx, enc, launch::Matmul { y: &scratch, ..mm }));
                let slots = launch::LoraB {
                    h: &wide_h,
                    h_offset: 0,
                    h_stride: m * width,
                    params: &wide_b,
                    b_offset: 0,
                    rank: m * width,
                    scale: 1.0,
                };
                let as_wide = run(&ctx, |enc| {
                    launch::matmul_lora_forward(&ctx, enc, launch::Matmul { y: &scratch, ..mm }, slots, None)
                });
                let what = format!("{label} with rows' own B products of width {width} {m}x{n}x{k}");
                let simd8 = ctx.report.kernels.matmul == edgetune::gpu::KernelFamily::Simd8;
                if m * width <= k {
                    assert_eq!(dispatches, as_wide, "{what}: fused into the product");
                } else if !simd8 {
                    assert_eq!(dispatches, alone + 1, "{what}: a tiled core adds them apart");
                } else {
                    assert!(dispatches == as_wide || dispatches == alone + 1, "{what}: {dispatches} vs {alone}");
                }
                let got = ctx.read_f32(&y, m * n).expect("readback");
                let product = r::matmul_forward(&x, &wd, None, m, n, k);
                let hb_sum = |t: usize, c: usize, f: fn(f64) -> f64| -> f64 {
                    let e = &rows[t];
                    (0..e.rank).map(|j| f(f64::from(h_at(t, j)) * f64::from(b_at(e, c, j)))).sum::<f64>()
                        * f64::from(e.scale)
                };
                let f16 = f16_slack(
                    f16_products(&ctx),
                    (m, n, k + m * width),
                    1.0,
                    |t, j| match j.checked_sub(k) {
                        None => x[t * k + j],
                        Some(s) if s / width == t => h_at(t, s % width),
                        Some(_) => 0.0,
                    },
                    |c, j| match j.checked_sub(k) {
                        None => wd[c * k + j],
                        Some(s) => rows[s / width].scale * b_at(&rows[s / width], c, s % width),
                    },
                );
                let (want, slack) = wanted_with_slack(f16, (m, n), (k, width), |t, c| {
                    let at = t * n + c;
                    let v = f64::from(product[at] + bias[c] + y0[at]) + hb_sum(t, c, |v| v);
                    let xw: f64 = (0..k).map(|j| f64::from(x[t * k + j].abs() * mass[c * k + j])).sum();
                    (v, xw + hb_sum(t, c, f64::abs), f64::from(bias[c].abs() + y0[at].abs()))
                });
                assert_close_slack(&what, &got, &want, 0.0, 0.0, &slack);
                // The twin's B products against the same sums.
                for t in 0..m {
                    for c in 0..n {
                        let bound = (width + 2) as f64 * f64::from(f32::EPSILON) * hb_sum(t, c, f64::abs);
                        let d = (f64::from(twin_b[t * n + c]) - hb_sum(t, c, |v| v)).abs();
                        assert!(d <= bound, "{what}: the twin's row {t} output {c}");
                    }
                }
            }
            let mm = launch::Matmul {
                x: &xb,
                w: launch::Weight::Dense(&on_gpu.dense),
                bias: None,
                y: &bb,
                m,
                n,
                k,
                out: launch::OutCols::whole(n),
            };
            // One a padded block (16 bytes) shorter than needed.
            let short_h = ctx.storage_zeroed("h", ((m - 1) * h_stride + h_col + width - 1) / 4 * 4);
            let short_table = ctx.storage_from("table", &table[..table.len() - 4]);
            let mut enc = ctx.encoder();
            let mut refused = vec![
                (launch::Matmul { m: 1, ..mm }, b, "reads one row"),
                (launch::Matmul { out: launch::OutCols::whole(n).scaled(0.5), ..mm }, b, "alpha 1"),
                (launch::Matmul { out: launch::OutCols::at(n + 1, 0), ..mm }, b, "whole rows"),
                (mm, launch::RowsB { h_col: h_stride - width + 1, ..b }, "h holds"),
                (
                    mm,
                    launch::RowsB { adapters: launch::RowsAdapters { table: &short_table, ..adapters }, ..b },
                    "table holds",
                ),
            ];
            if (m - 1) * h_stride + h_col + width > 4 {
                refused.push((mm, launch::RowsB { h: &short_h, ..b }, "h holds"));
            }
            for (mm, b, why) in refused {
                let err = launch::matmul_rows_lora_forward(&ctx, &mut enc, mm, b).expect_err(why);
                assert!(err.to_string().contains(why), "{err}");
            }
        }
    }
}

/// The half family's products (shaders/common/tile128_half.wgsl: f16 operands, each product
/// rounded to f16 and summed in f16 over runs of 8 steps, the runs summed in f32), forced, each
/// output against the exact sum (f64) within `common::f16_slack`'s bound for f16 runs (from the
/// maths: (8 + 2) u of sum_j |a b| with u = 2^-11, and f16's range floor) plus 2^-23 of the
/// sum for the epilogue. The cases reach what the core does beyond tile128's: 2,049 tokens;
/// reductions of 77, 78, 100, 200 and 576 (no multiple of the step; 576 split into slices); rows of
/// activations past f16's largest value (10^6) and gradients below its smallest normal one
/// (10^-6), which only the rows' power-of-two scales keep in range; and a weight with values of 2
/// and 300, whose steps are summed exactly in f32 (300 times B's scale of 2^8 is past f16's
/// range). Each ran on its `.half` kernel (LoRA's x A^T of rank 16 on tile128's narrow blocks,
/// in f32), and the first case's worst output is further from the exact sum than f32 sums can
/// be ((2 red + 70) 2^-24 of its mass), so the products were f16.
#[test]
fn half_sums_products_in_f16_runs_within_their_bound() {
    use common::Arith;
    use edgetune::gpu::{KernelFamily, Timer};
    let opts = GpuOptions { kernels: Some(KernelFamily::Half), ..Default::default() };
    let ctx = GpuContext::new(&opts).expect("half (lavapipe has shader-f16)");
    assert_eq!(f16_products(&ctx), Arith::F16Runs);
    #[derive(Clone, Copy, PartialEq)]
    enum W {
        Nf4,
        F16,
        DenseWithLarge,
    }
    // (what, forward (else the input gradient), weight, m, n, k, scale of the odd rows of the
    // activations or gradients, the kernel)
    let cases = [
        ("NF4 forward, 2049 tokens", true, W::Nf4, 2049, 70, 200, 1.0, "matmul_nf4_t128.half"),
        ("NF4 forward, activations past f16's range", true, W::Nf4, 130, 64, 576, 1e6, "matmul_nf4_t128.half"),
        (
            "NF4 input gradient, gradients below f16's normal range",
            false,
            W::Nf4,
            33,
            576,
            72,
            1e-6,
            "matmul_nf4_backward_t128.half",
        ),
        ("f16 input gradient", false, W::F16, 70, 77, 130, 1.0, "matmul_f16_backward_t128.half"),
        ("f16 forward", true, W::F16, 17, 129, 78, 1.0, "matmul_f16_t128.half"),
        ("dense forward, weights of 2 and 300", true, W::DenseWithLarge, 70, 64, 100, 1.0, "matmul_t128.half"),
        // LoRA's x A^T (16 columns) leaves f16 to tile128's narrow blocks.
        ("x A^T, rank 16", true, W::DenseWithLarge, 2049, 16, 200, 1.0, "matmul_t128.narrow"),
    ];
    for (i, &(what, forward, weight, m, n, k, odd_scale, kernel)) in cases.iter().enumerate() {
        let seed = 700 + 10 * i as u64;
        // a: the activations (m, k) or gradients (m, n); odd rows scaled.
        let red_a = if forward { k } else { n };
        let mut a = rand(m * red_a, seed, 1.0);
        for r in (1..m).step_by(2) {
            a[r * red_a..(r + 1) * red_a].iter_mut().for_each(|v| *v *= odd_scale);
        }
        let mut w = rand(n * k, seed + 1, 0.3);
        if weight == W::DenseWithLarge {
            w[3 * k + 5] = 300.0;
            w[7 * k + 60] = -2.0;
            w[11 * k + 99] = 2.5;
        }
        let (wd, packed, absmax, halves) = match weight {
            W::Nf4 => {
                let q = nf4::quantize(&w, &[n, k], 64).expect("quantize");
                (q.dequantize(), q.packed, q.absmax, vec![])
            }
            W::F16 => {
                let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                (h.iter().map(|v| v.to_f32()).collect(), vec![], vec![], h)
            }
            W::DenseWithLarge => (w.clone(), vec![], vec![], vec![]),
        };
        // (Unused buffers get one element: a binding is never empty.)
        let packed = if packed.is_empty() { vec![0] } else { packed };
        let absmax = if absmax.is_empty() { vec![0.0] } else { absmax };
        let halves = if halves.is_empty() { vec![half::f16::ZERO] } else { halves };
        let (pb, ab) = (ctx.storage_from("packed", &packed), ctx.storage_from("absmax", &absmax));
        let (hb, db) = (ctx.storage_from("halves", &halves), ctx.storage_from("w", &wd));
        let wt = match weight {
            W::Nf4 => launch::Weight::Nf4 { packed: &pb, absmax: &ab, block_size: 64 },
            W::F16 => launch::Weight::F16(&hb),
            W::DenseWithLarge => launch::Weight::Dense(&db),
        };
        // The output (rows, cols) over red; b(c, j) the weight as the product reads it.
        let (rows, cols, red) = if forward { (m, n, k) } else { (m, k, n) };
        let b = |c: usize, j: usize| if forward { wd[c * k + j] } else { wd[j * k + c] };
        let ab_buf = ctx.storage_from("a", &a);
        let out = ctx.storage_zeroed("out", rows * cols);
        ctx.start_profiling(Timer::WallClock);
        run(&ctx, |enc| {
            if forward {
                let mm =
                    launch::Matmul { x: &ab_buf, w: wt, bias: None, y: &out, m, n, k, out: launch::OutCols::whole(n) };
                launch::matmul_forward(&ctx, enc, mm)
            } else {
                let dy = launch::DyCols::whole(&ab_buf, n);
                let grad = launch::MatmulGrad { dy, w: wt, dx: &out, m, n, k, out: launch::OutCols::whole(k) };
                launch::matmul_backward(&ctx, enc, grad)
            }
        });
        let names: Vec<&str> = ctx.stop_profiling().expect("profile").iter().map(|(name, _)| *name).collect();
        let said = format!("{what} ({m}, {n}, {k}): {names:?}");
        assert!(names.contains(&kernel), "{said}: {kernel} did not run");
        assert!(names.iter().all(|n| *n == kernel || *n == "matmul_split_reduce"), "{said}");
        let got = ctx.read_f32(&out, rows * cols).expect("read");
        let slack = f16_slack(Arith::F16Runs, (rows, cols, red), 1.0, |r, j| a[r * red + j], b);
        let (mut past_f32, mut of_bound) = (0f64, 0f64);
        for (at, &g) in got.iter().enumerate() {
            let (r, c) = (at / cols, at % cols);
            let terms = (0..red).map(|j| f64::from(a[r * red + j]) * f64::from(b(c, j)));
            let (exact, mass) = terms.fold((0f64, 0f64), |(s, m), t| (s + t, m + t.abs()));
            let err = (f64::from(g) - exact).abs();
            let bound = f64::from(slack[at]) + 2f64.powi(-23) * exact.abs();
            assert!(err <= bound, "{said}: output ({r}, {c}) {g} against the exact {exact} (bound {bound:e})");
            past_f32 = past_f32.max(err / ((2 * red + 70) as f64 * 2f64.powi(-24) * mass));
            of_bound = of_bound.max(err / bound);
        }
        if i == 0 {
            assert!(past_f32 > 1.0, "{said}: every output within f32's bound ({past_f32}): no f16 arithmetic?");
        }
        eprintln!("{said}: worst error {past_f32:.1} times f32's bound, {of_bound:.3} of its own");
    }
}
