//! Opening a GPU context: the adapter and the kernel families the table picks
//! (`gpu/family.rs`), then the self-test of any family that must prove itself on this GPU
//! before it is used. Today those are coop16 and coop8, whose cooperative-matrix kernels no CPU
//! adapter can run: NF4 matmuls forward and for the input gradient (and each with a split
//! reduction) against the exact sums, within the bound of their rounding (both operands to f16
//! for coop16; f32 products and sums for coop8). A failure reopens the device with the family
//! the table would pick without matrix units and records why in
//! [`AdapterReport::coop_self_test`]; when the family was forced, it is an error instead.

use super::context::{AdapterReport, GpuContext, GpuOptions};
use super::family::{self, KernelFamily};
use super::launch::{self, Matmul, OutCols, Weight};
use crate::error::{Error, Result};

impl GpuContext {
    /// Opens the adapter chosen by `opts` (see gpu/context.rs) and settles its kernel families.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let mut ctx = Self::open_unprobed(opts)?;
        let family = ctx.report.kernels.family;
        if !family.uses_matrix_units() {
            return Ok(ctx);
        }
        let outcome = coop_self_test(&ctx, family);
        match settle_coop(&ctx.report, outcome)? {
            Settled::Keep(said) => {
                ctx.report.coop_self_test = Some(said);
                Ok(ctx)
            }
            // A fresh device without the experimental feature: a failed kernel may have left
            // the first one in any state, lost included.
            Settled::FallBack(family, said) => {
                drop(ctx);
                let mut ctx = Self::open_unprobed(&GpuOptions { kernels: Some(family), ..opts.clone() })?;
                ctx.report.forced = None;
                ctx.report.coop_self_test = Some(said);
                Ok(ctx)
            }
        }
    }
}

/// What a cooperative-matrix family's self-test decides.
#[derive(Debug, PartialEq)]
enum Settled {
    /// Use the family; what the test found.
    Keep(String),
    /// Use this family instead; why.
    FallBack(KernelFamily, String),
}

/// Keeps the adapter's cooperative-matrix family when its self-test passed; otherwise falls
/// back to the table's choice without matrix units (neither coop16 nor coop8: the other
/// configuration would go untested), or fails when the family was forced.
fn settle_coop(report: &AdapterReport, outcome: Result<String>) -> Result<Settled> {
    let tested = report.kernels.family;
    match outcome {
        Ok(summary) => Ok(Settled::Keep(format!("{tested} passed: {summary}"))),
        Err(e) if report.forced == Some(tested) => Err(Error::Gpu(format!(
            "the {tested} kernels were forced but failed their self-test on {}: {e}",
            report.name
        ))),
        Err(e) => {
            let without = family::AdapterFacts { coop_16x16_f16: false, coop_8x8_f32: false, ..report.facts };
            let family = family::choose(&without, None)?.family;
            Ok(Settled::FallBack(family, format!("{tested} failed, using {family}: {e}")))
        }
    }
}

/// Unit roundoff of f16.
const F16_U: f64 = 1.0 / 2048.0;

/// How far a coop8 output `out[r, c] = sum_j a[j] b[j]` (f32 operands, `red` long) may lie from
/// the exact sum: each of the `red` products and each addition rounded to f32 (u = 2^-24), in
/// whatever order the matrix units and a split reduction add them, which is at most
/// gamma(red + 1) = (red + 1) u / (1 - (red + 1) u) of the mass sum_j |a_j b_j| (Higham, the
/// bound for any order of summing rounded products). The NF4 weights dequantize to the same
/// f32 values on both sides (one rounded product, code times absmax).
pub(crate) fn f32_bound(a: &[f32], b: &[f32]) -> f64 {
    let mass: f64 = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) * f64::from(y)).abs()).sum();
    let nu = (a.len() + 1) as f64 * f64::powi(2.0, -24);
    nu / (1.0 - nu) * mass
}

/// How far a coop16 output `out[r, c] = sum_j a[j] b[j]` (`a` a row of the activations or
/// gradients, `b` a weight row, both `red` long) may lie from the exact sum:
/// - each operand rounded to f16 (relative u = 2^-11 each, for normal values): (2u + u^2) of
///   the mass sum_j |a_j b_j|;
/// - the sums in f32 on both sides, in different orders: 2 red 2^-24 of the mass;
/// - an operand in f16's subnormal range is off by up to 2^-25 absolutely: b as it is
///   (2^-25 sum_j |a_j|), a after its row was scaled to a largest magnitude of at least 2^14
///   (2^-39 max_j |a_j| sum_j |b_j|).
pub(crate) fn f16_bound(a: &[f32], b: &[f32]) -> f64 {
    let (mut mass, mut sum_a, mut sum_b, mut top_a) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x).abs(), f64::from(y).abs());
        mass += x * y;
        sum_a += x;
        sum_b += y;
        top_a = top_a.max(x);
    }
    let f32_sums = 2.0 * a.len() as f64 * f64::powi(2.0, -24);
    (2.0 * F16_U + F16_U * F16_U + f32_sums) * mass + f64::powi(2.0, -25) * sum_a + f64::powi(2.0, -39) * top_a * sum_b
}

/// One self-test case: `x` (rows, red) against `w` (cols, red) as the kernel reads them.
struct Case<'a> {
    label: &'a str,
    rows: usize,
    cols: usize,
    red: usize,
    x: &'a [f32],
    w_rows: &'a [f32],
}

/// How far an output may lie from the exact sum, given the two rows it multiplies.
type Bound = fn(&[f32], &[f32]) -> f64;

/// Compares every output with the exact sum (in f64, on the CPU) within `bound` ([`f16_bound`]
/// or [`f32_bound`]); returns the worst error as a share of its bound.
fn check_case(c: &Case<'_>, got: &[f32], bound: Bound) -> Result<f64> {
    let mut worst = 0f64;
    for r in 0..c.rows {
        for col in 0..c.cols {
            let (a, b) = (&c.x[r * c.red..][..c.red], &c.w_rows[col * c.red..][..c.red]);
            let bound = bound(a, b);
            let exact: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            let g = got[r * c.cols + col];
            let err = (f64::from(g) - exact).abs();
            if err.is_nan() || err > bound {
                return Err(Error::Gpu(format!(
                    "{} {}x{}x{}: output ({r}, {col}) is {g} where the exact sum is {exact} (bound {bound:.3e})",
                    c.label, c.rows, c.cols, c.red
                )));
            }
            worst = worst.max(err / bound.max(f64::MIN_POSITIVE));
        }
    }
    Ok(worst)
}

/// Runs the kernels of `family` (coop16 or coop8) on NF4 weights and compares every output with
/// the exact sum within the bound of its rounding ([`f16_bound`] or [`f32_bound`], computed
/// here: production code does not lean on the tests' oracle): the forward product on
/// activations of moderate size and of sizes past f16's largest value, and the input gradient
/// on gradients far below f16's smallest normal value (for coop16, each row's power-of-two
/// scale is what keeps them exact to f16's precision). Returns the worst error as a share of
/// its bound.
fn coop_self_test(ctx: &GpuContext, family: KernelFamily) -> Result<String> {
    let (bound, name): (Bound, &str) =
        if family == KernelFamily::Coop8 { (f32_bound, "f32") } else { (f16_bound, "f16") };
    let mut worst = 0f64;
    // Forward: a 2 x 2 grid of blocks with partial tiles (and a reduction of 64, where coop8's
    // f32 bound is tight enough to catch operands rounded to f16); a small grid whose long reduction is
    // split; activations up to 1e6 (f16's largest value is 65504). The input gradient
    // dx (m, k) = dy (m, n) W (n, k), with dy around 1e-6 (below f16's normal range), over a
    // 2 x 2 grid and over a split reduction.
    let cases = [
        (false, 130usize, 136usize, 264usize, 1.0f32),
        (false, 130, 136, 64, 1.0),
        (false, 20, 40, 1024, 1.0),
        (false, 130, 136, 264, 1e6),
        (true, 130, 264, 136, 1e-6),
        (true, 20, 1024, 128, 1e-6),
    ];
    for (i, &(dx, m, n, k, scale)) in cases.iter().enumerate() {
        let a = values(m * if dx { n } else { k }, 1 + i as u64, scale);
        let w = values(n * k, 11 + i as u64, 0.1);
        let block = 64;
        let q = crate::quant::nf4::quantize(&w, &[n, k], block).map_err(|e| Error::Gpu(format!("NF4: {e}")))?;
        let wd = q.dequantize();
        let (ab, pb, sb) = (
            ctx.storage_from("self-test operand", &a),
            ctx.storage_from("packed", &q.packed),
            ctx.storage_from("absmax", &q.absmax),
        );
        let w4 = Weight::Nf4 { packed: &pb, absmax: &sb, block_size: block };
        let cols = if dx { k } else { n };
        let y = ctx.storage_zeroed("self-test output", m * cols);
        let mut enc = ctx.encoder();
        if dx {
            let dy = launch::DyCols::whole(&ab, n);
            let g = launch::MatmulGrad { dy, w: w4, dx: &y, m, n, k, out: OutCols::whole(k) };
            launch::matmul_backward(ctx, &mut enc, g)?;
        } else {
            let f = Matmul { x: &ab, w: w4, bias: None, y: &y, m, n, k, out: OutCols::whole(n) };
            launch::matmul_forward(ctx, &mut enc, f)?;
        }
        ctx.submit_encoder(&mut enc);
        let got = ctx.read_f32(&y, m * cols)?;
        ctx.check()?;
        // The weight as the product reads it: rows of W forward, its columns for dx.
        let (label, red, w_rows) = if dx {
            ("input gradient", n, (0..k * n).map(|i| wd[(i % n) * k + i / n]).collect())
        } else {
            ("forward", k, wd)
        };
        let case = Case { label, rows: m, cols, red, x: &a, w_rows: &w_rows };
        worst = worst.max(check_case(&case, &got, bound)?);
    }
    Ok(format!("worst error {:.1} % of the {name} bound", 100.0 * worst))
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

    /// What coop16 does to one output, on the CPU: the row of `a` scaled by the power of two
    /// the kernel picks (when `scaled`), both operands rounded to f16, the products summed in
    /// f64 and the scale divided out.
    fn coop16_like(a: &[f32], b: &[f32], scaled: bool) -> f64 {
        let top = a.iter().fold(0f32, |t, v| t.max(v.abs()));
        let e = if scaled && top > 0.0 { (15 - (top.log2().floor() as i32 + 1)).clamp(-126, 126) } else { 0 };
        let h = |v: f32| f64::from(half::f16::from_f32(v).to_f32());
        let sum: f64 = a.iter().zip(b).map(|(&x, &y)| h(x * 2f32.powi(e)) * h(y)).sum();
        sum / 2f64.powi(e)
    }

    /// The bound holds for the kernel's arithmetic, on moderate operands, on gradients far
    /// below f16's normal range and on activations past its largest value, and is tight enough
    /// to catch the same gradients without the row scale (flushed to zero or to f16's coarse
    /// subnormals) and activations that overflow.
    #[test]
    fn the_f16_bound_holds_for_the_scaled_rounding_and_catches_the_unscaled_one() {
        for (scale, unscaled_fails) in [(1.0f32, false), (1e-6, true), (3e-9, true), (1e6, true)] {
            let mut worst = [0f64; 2];
            for row in 0..64u64 {
                let a = values(512, 100 + row, scale);
                let b = values(512, 900 + row, 0.1);
                let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
                let bound = f16_bound(&a, &b);
                for (i, scaled) in [true, false].into_iter().enumerate() {
                    let err = (coop16_like(&a, &b, scaled) - exact).abs();
                    worst[i] = worst[i].max(if err.is_nan() { f64::INFINITY } else { err / bound });
                }
            }
            assert!(worst[0] <= 1.0, "scale {scale}: the scaled rounding is {:.2} of the bound", worst[0]);
            assert!(worst[0] > 0.01, "scale {scale}: a bound 100 times too loose ({:.4})", worst[0]);
            assert_eq!(
                worst[1] > 1.0,
                unscaled_fails,
                "scale {scale}: unscaled rounding at {:.2} of the bound",
                worst[1]
            );
        }
    }

    /// What coop8 does to one output, on the CPU: f32 products summed in f32, in the order of
    /// 8-long fragments whose partial sums are added last (one order the matrix units may use).
    fn coop8_like(a: &[f32], b: &[f32]) -> f64 {
        let parts: Vec<f32> =
            a.chunks(8).zip(b.chunks(8)).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum()).collect();
        f64::from(parts.iter().rev().sum::<f32>())
    }

    /// The f32 bound holds for f32 arithmetic in two summation orders and catches a lost
    /// fragment. Being a worst case (it grows as red^2 times the terms' size, rounding errors
    /// as sqrt(red)), it catches operands quietly rounded to f16 only on short reductions: at 64
    /// (which the self-test has a case of), not at 1,024.
    #[test]
    fn the_f32_bound_holds_for_f32_sums_and_catches_a_lost_term_and_short_f16_sums() {
        let h = |v: f32| half::f16::from_f32(v).to_f32();
        for (red, f16_caught) in [(64usize, true), (1024, false)] {
            let mut worst = [0f64; 3];
            for row in 0..64u64 {
                let a = values(red, 300 + row, 1.0);
                let b = values(red, 700 + row, 0.1);
                let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
                let bound = f32_bound(&a, &b);
                let ordered = f64::from(a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>());
                let halves = f64::from(a.iter().zip(&b).map(|(&x, &y)| h(x) * h(y)).sum::<f32>());
                let lost = coop8_like(&a[8..], &b[8..]);
                for got in [ordered, coop8_like(&a, &b)] {
                    worst[0] = worst[0].max((got - exact).abs() / bound);
                }
                worst[1] = worst[1].max((halves - exact).abs() / bound);
                worst[2] = worst[2].max((lost - exact).abs() / bound);
            }
            assert!(worst[0] <= 1.0, "red {red}: f32 sums at {:.3} of the bound", worst[0]);
            assert!(worst[0] > 1e-4, "red {red}: a bound 10^4 times too loose ({:.2e})", worst[0]);
            assert_eq!(worst[1] > 1.0, f16_caught, "red {red}: f16 operands at {:.2} of the f32 bound", worst[1]);
            assert!(worst[2] > 1.0, "red {red}: a lost fragment passes the f32 bound ({:.2})", worst[2]);
        }
    }

    /// The fallback path, which no CPU adapter reaches through a real self-test, for both
    /// cooperative-matrix families.
    #[test]
    fn a_failed_self_test_falls_back_unless_the_family_was_forced() {
        let ctx = GpuContext::open_unprobed(&GpuOptions::default()).expect("an adapter (lavapipe in CI)");
        let mut report = ctx.report.clone();
        // An adapter that lists both configurations: a failed coop16 must not leave it on coop8,
        // whose kernels have not been tested either.
        report.facts = family::AdapterFacts {
            device_type: wgpu::DeviceType::DiscreteGpu,
            subgroups: true,
            subgroup_size: (32, 32),
            max_workgroup_storage: 49152,
            max_invocations: 1024,
            coop_16x16_f16: true,
            shader_f16: true,
            coop_8x8_f32: true,
        };
        for tested in [KernelFamily::Coop16, KernelFamily::Coop8] {
            report.kernels = family::kernels_of(tested, &report.facts);
            report.forced = None;
            let failed = settle_coop(&report, Err(Error::Gpu("output (0, 0) is 3 where the CPU twin gives 1".into())));
            match failed.expect("falls back") {
                Settled::FallBack(KernelFamily::Tile128, said) => assert!(
                    said.starts_with(&format!("{tested} failed, using tile128")) && said.contains("CPU twin gives 1"),
                    "{said}"
                ),
                other => panic!("{tested}: {other:?}"),
            }
            let passed = settle_coop(&report, Ok("worst error 3.0 % of the bound".into())).expect("kept");
            assert_eq!(passed, Settled::Keep(format!("{tested} passed: worst error 3.0 % of the bound")));
            report.forced = Some(tested);
            let err = settle_coop(&report, Err(Error::Gpu("NaN".into()))).expect_err("forced").to_string();
            assert!(err.contains(&format!("the {tested} kernels were forced")) && err.contains("self-test"), "{err}");
        }
    }
}
