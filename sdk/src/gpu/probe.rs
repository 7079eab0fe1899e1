//! Opening a GPU context: the adapter and the kernel families the table picks
//! (`gpu/family.rs`), then the self-test of any family that must prove itself on this GPU
//! before it is used. Today that is coop16, whose cooperative-matrix kernels no CPU adapter can
//! run: an NF4 matmul (and one with a split reduction) against the CPU twin, within the bound
//! of rounding both operands to f16. A failure reopens the device with the family the table
//! would pick without matrix units and records why in [`AdapterReport::coop16_self_test`];
//! when coop16 was forced, it is an error instead.

use super::context::{AdapterReport, GpuContext, GpuOptions};
use super::family::{self, KernelFamily};
use super::launch::{self, Matmul, OutCols, Weight};
use crate::error::{Error, Result};

impl GpuContext {
    /// Opens the adapter chosen by `opts` (see gpu/context.rs) and settles its kernel families.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let mut ctx = Self::open_unprobed(opts)?;
        if ctx.report.kernels.family != KernelFamily::Coop16 {
            return Ok(ctx);
        }
        let outcome = coop16_self_test(&ctx);
        match settle_coop16(&ctx.report, outcome)? {
            Settled::Keep(said) => {
                ctx.report.coop16_self_test = Some(said);
                Ok(ctx)
            }
            // A fresh device without the experimental feature: a failed kernel may have left
            // the first one in any state, lost included.
            Settled::FallBack(family, said) => {
                drop(ctx);
                let mut ctx = Self::open_unprobed(&GpuOptions { kernels: Some(family), ..opts.clone() })?;
                ctx.report.forced = None;
                ctx.report.coop16_self_test = Some(said);
                Ok(ctx)
            }
        }
    }
}

/// What the coop16 self-test decides.
#[derive(Debug, PartialEq)]
enum Settled {
    /// Use coop16; what the test found.
    Keep(String),
    /// Use this family instead; why.
    FallBack(KernelFamily, String),
}

/// Keeps coop16 when its self-test passed; otherwise falls back to the table's choice without
/// it, or fails when coop16 was forced.
fn settle_coop16(report: &AdapterReport, outcome: Result<String>) -> Result<Settled> {
    match outcome {
        Ok(summary) => Ok(Settled::Keep(format!("passed: {summary}"))),
        Err(e) if report.forced == Some(KernelFamily::Coop16) => Err(Error::Gpu(format!(
            "the coop16 kernels were forced but failed their self-test on {}: {e}",
            report.name
        ))),
        Err(e) => {
            let without = family::AdapterFacts { coop_16x16_f16: false, ..report.facts };
            let family = family::choose(&without, None)?.family;
            Ok(Settled::FallBack(family, format!("failed, using {family}: {e}")))
        }
    }
}

/// Unit roundoff of f16.
const F16_U: f64 = 1.0 / 2048.0;

/// Runs the coop16 forward kernel on NF4 weights and compares every output with the CPU twin:
/// `|gpu - cpu| <= (2u + 1e-5) * sum_j |x_j w_j| + 1e-6`, two f16 roundings of each product
/// (u = 2^-11) plus f32 summation in another order. Returns the worst error as a share of its
/// bound.
fn coop16_self_test(ctx: &GpuContext) -> Result<String> {
    let mut worst = 0f64;
    // A 2 x 2 grid of blocks with partial tiles; then a small grid whose long reduction is split.
    for (i, &(m, n, k, block)) in [(130usize, 136usize, 264usize, 64usize), (20, 40, 1024, 64)].iter().enumerate() {
        let x = values(m * k, 1 + i as u64, 1.0);
        let w = values(n * k, 11 + i as u64, 0.1);
        let q = crate::quant::nf4::quantize(&w, &[n, k], block).map_err(|e| Error::Gpu(format!("NF4: {e}")))?;
        let wd = q.dequantize();
        let want = crate::reference::matmul_forward(&x, &wd, None, m, n, k);
        let (xb, pb, ab) = (
            ctx.storage_from("self-test x", &x),
            ctx.storage_from("packed", &q.packed),
            ctx.storage_from("absmax", &q.absmax),
        );
        let y = ctx.storage_zeroed("self-test y", m * n);
        let mut enc = ctx.encoder();
        let w4 = Weight::Nf4 { packed: &pb, absmax: &ab, block_size: block };
        launch::matmul_forward(
            ctx,
            &mut enc,
            Matmul { x: &xb, w: w4, bias: None, y: &y, m, n, k, out: OutCols::whole(n) },
        )?;
        ctx.submit_encoder(&mut enc);
        let got = ctx.read_f32(&y, m * n)?;
        ctx.check()?;
        for r in 0..m {
            for c in 0..n {
                let mass: f64 = (0..k).map(|j| f64::from((x[r * k + j] * wd[c * k + j]).abs())).sum();
                let bound = (2.0 * F16_U + 1e-5) * mass + 1e-6;
                let err = (f64::from(got[r * n + c]) - f64::from(want[r * n + c])).abs();
                if err.is_nan() || err > bound {
                    return Err(Error::Gpu(format!(
                        "{m}x{n}x{k}: output ({r}, {c}) is {} where the CPU twin gives {} (bound {bound:.3e})",
                        got[r * n + c],
                        want[r * n + c]
                    )));
                }
                worst = worst.max(err / bound);
            }
        }
    }
    Ok(format!("worst error {:.1} % of the f16 bound", 100.0 * worst))
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback path, which no CPU adapter reaches through a real self-test.
    #[test]
    fn a_failed_self_test_falls_back_unless_coop16_was_forced() {
        let ctx = GpuContext::open_unprobed(&GpuOptions::default()).expect("an adapter (lavapipe in CI)");
        let mut report = ctx.report.clone();
        report.facts = family::AdapterFacts {
            device_type: wgpu::DeviceType::DiscreteGpu,
            subgroups: true,
            subgroup_size: (32, 32),
            max_workgroup_storage: 49152,
            max_invocations: 1024,
            coop_16x16_f16: true,
        };
        report.kernels = family::kernels_of(KernelFamily::Coop16, &report.facts);
        report.forced = None;
        let failed = settle_coop16(&report, Err(Error::Gpu("output (0, 0) is 3 where the CPU twin gives 1".into())));
        match failed.expect("falls back") {
            Settled::FallBack(KernelFamily::Tile128, said) => {
                assert!(said.starts_with("failed, using tile128") && said.contains("CPU twin gives 1"), "{said}")
            }
            other => panic!("{other:?}"),
        }
        let passed = settle_coop16(&report, Ok("worst error 3.0 % of the f16 bound".into())).expect("kept");
        assert_eq!(passed, Settled::Keep("passed: worst error 3.0 % of the f16 bound".into()));
        report.forced = Some(KernelFamily::Coop16);
        let err = settle_coop16(&report, Err(Error::Gpu("NaN".into()))).expect_err("forced").to_string();
        assert!(err.contains("forced") && err.contains("self-test"), "{err}");
    }
}
