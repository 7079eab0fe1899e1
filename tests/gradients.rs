//! Backward kernels. Two checks per op:
//! - the CPU twin in `edgetune::reference` against central finite differences of the forward
//!   twin (so the maths is right);
//! - the WGSL kernel against the CPU twin on lavapipe (so the kernel is the maths), on odd
//!   shapes that do not divide the workgroups.

mod common;

use common::{assert_close, assert_close_slack, f16_products, f16_slack, gpu, gpus, rand, run};
use edgetune::gpu::launch::{self, AttentionGrads, AttentionShape, DyCols, OutCols, RopeShape, Weight};
use edgetune::gpu::{GpuContext, GpuOptions, KernelFamily};
use edgetune::quant::nf4;
use edgetune::reference as r;

/// Central finite differences of L(x) = sum_j c_j y_j(x), with y = f(x), at every coordinate,
/// against the analytic gradient `grad` (the backward twin applied to dy = c).
///
/// Tolerance: the forward twins run in f32. Each y_j carries a rounding error of a few ulps, so
/// L carries about eps32 * sum_j |c_j y_j| = `noise`, and a difference quotient divides that by
/// 2h; the truncation error of central differences is h^2/6 * |L'''|, about 1e-5 for h = 1e-2
/// and O(1) third derivatives. Each coordinate must agree within 4 * noise / (2h) + 1e-4 + 1e-3 * |g|.
fn fd_check(what: &str, x: &[f32], grad: &[f32], c: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) {
    let h = 1e-2f32;
    let loss = |x: &[f32]| -> (f64, f64) {
        let y = f(x);
        assert_eq!(y.len(), c.len(), "{what}: projection length");
        let l = y.iter().zip(c).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
        let s = y.iter().zip(c).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum::<f64>();
        (l, s)
    };
    let mut worst = 0f64;
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        let ((lp, sp), (lm, sm)) = (loss(&xp), loss(&xm));
        let fd = (lp - lm) / (2.0 * f64::from(h));
        let noise = f64::from(f32::EPSILON) * sp.max(sm);
        let tol = 4.0 * noise / (2.0 * f64::from(h)) + 1e-4 + 1e-3 * f64::from(grad[i]).abs();
        let err = (fd - f64::from(grad[i])).abs();
        assert!(err <= tol, "{what}[{i}]: analytic {} vs finite difference {fd} (err {err:e}, tol {tol:e})", grad[i]);
        worst = worst.max(err / tol);
    }
    eprintln!("{what}: {} coordinates, worst error {:.2} of tolerance", x.len(), worst);
}

#[test]
fn cross_entropy_backward_twin_matches_finite_differences() {
    let (rows, vocab) = (3, 11);
    let logits = rand(rows * vocab, 1, 3.0);
    let targets = [4u32, u32::MAX, 10];
    let scale = 0.5;
    let (_, grad) = r::cross_entropy_backward(&logits, &targets, vocab, scale);
    // L = scale * sum of the row losses: c = scale on every row.
    fd_check("cross_entropy dlogits", &logits, &grad, &[scale; 3], |x| r::cross_entropy_forward(x, &targets, vocab));
    // Through Gemma 2's final soft cap (at 2: these logits reach 3, so it bends them).
    let cap = 2.0;
    let z = r::logit_softcap(&logits, cap);
    let (_, dz) = r::cross_entropy_backward(&z, &targets, vocab, scale);
    let grad = r::logit_softcap_backward(&dz, &z, cap);
    fd_check("soft-capped cross_entropy dlogits", &logits, &grad, &[scale; 3], |x| {
        r::cross_entropy_forward(&r::logit_softcap(x, cap), &targets, vocab)
    });
}

#[test]
fn matmul_backward_twins_match_finite_differences() {
    let (m, n, k) = (3, 5, 7);
    let x = rand(m * k, 2, 1.0);
    let w = rand(n * k, 3, 1.0);
    let c = rand(m * n, 4, 1.0);
    let dx = r::matmul_backward(&c, &w, m, n, k);
    fd_check("matmul dx", &x, &dx, &c, |x| r::matmul_forward(x, &w, None, m, n, k));
    let dw = r::matmul_backward_w(&c, &x, m, n, k);
    fd_check("matmul dw", &w, &dw, &c, |w| r::matmul_forward(&x, w, None, m, n, k));
}

#[test]
fn rms_norm_backward_twin_matches_finite_differences() {
    let (rows, dim) = (3, 9);
    let x = rand(rows * dim, 5, 2.0);
    let w = rand(dim, 6, 1.0);
    let c = rand(rows * dim, 7, 1.0);
    let dx = r::rms_norm_backward(&x, &w, &c, 1e-5);
    fd_check("rms_norm dx", &x, &dx, &c, |x| r::rms_norm_forward(x, &w, 1e-5));
}

#[test]
fn rope_backward_twin_matches_finite_differences() {
    // Full and partial RoPE (4 of 6 values a head rotate).
    for (t, heads, hd, rd) in [(4, 2, 6, 6), (4, 2, 6, 4)] {
        let inv: Vec<f32> = (0..rd / 2).map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / rd as f32)).collect();
        let table = r::rope_table(&inv, 8);
        let positions = [0usize, 1, 0, 5];
        let x = rand(t * heads * hd, 8, 1.0);
        let c = rand(x.len(), 9, 1.0);
        let mut dx = c.clone();
        r::rope_backward(&mut dx, &table, heads, (hd, rd), &positions);
        fd_check("rope dx", &x, &dx, &c, |x| {
            let mut y = x.to_vec();
            r::rope_forward(&mut y, &table, heads, (hd, rd), &positions);
            y
        });
    }
}

#[test]
fn silu_mul_backward_twin_matches_finite_differences() {
    let gate = rand(13, 10, 4.0);
    let up = rand(13, 11, 2.0);
    let c = rand(13, 12, 1.0);
    let (dgate, dup) = r::silu_mul_backward(&gate, &up, &c);
    fd_check("silu_mul dgate", &gate, &dgate, &c, |g| r::silu_mul_forward(g, &up));
    fd_check("silu_mul dup", &up, &dup, &c, |u| r::silu_mul_forward(&gate, u));
}

#[test]
fn gelu_mul_backward_twin_matches_finite_differences() {
    let gate = rand(13, 13, 4.0);
    let up = rand(13, 14, 2.0);
    let c = rand(13, 15, 1.0);
    let (dgate, dup) = r::gelu_mul_backward(&gate, &up, &c);
    fd_check("gelu_mul dgate", &gate, &dgate, &c, |g| r::gelu_mul_forward(g, &up));
    fd_check("gelu_mul dup", &up, &dup, &c, |u| r::gelu_mul_forward(&gate, u));
}

#[test]
fn attention_backward_twin_matches_finite_differences_with_packing_and_gqa() {
    let (t, h, kvh, hd) = (5, 4, 2, 4);
    // Two packed samples: tokens 0..3 and 3..5.
    let key_start = [0usize, 0, 0, 3, 3];
    let q = rand(t * h * hd, 13, 1.0);
    let k = rand(t * kvh * hd, 14, 1.0);
    let v = rand(t * kvh * hd, 15, 1.0);
    let c = rand(q.len(), 16, 1.0);
    // Without a cap, and with Gemma 2's soft cap small enough to bend these scores (up to about 2).
    for softcap in [None, Some(0.7)] {
        let case = r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: 0, softcap };
        let (dq, dk, dv) = r::attention_backward(&q, &k, &v, &key_start, &c, case);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| r::attention_forward(q, k, v, &key_start, case);
        fd_check(&format!("attention dq {softcap:?}"), &q, &dq, &c, |x| fwd(x, &k, &v));
        fd_check(&format!("attention dk {softcap:?}"), &k, &dk, &c, |x| fwd(&q, x, &v));
        fd_check(&format!("attention dv {softcap:?}"), &v, &dv, &c, |x| fwd(&q, &k, x));
        // Packing: the second sample's outputs do not depend on the first sample's keys.
        let mut k2 = k.clone();
        k2[0] += 1.0;
        let (a, b) = (fwd(&q, &k, &v), fwd(&q, &k2, &v));
        assert_eq!(a[3 * h * hd..], b[3 * h * hd..], "a packed sample attended to another sample's keys");
    }
    // The cap is applied: it changes the output.
    let case = |softcap| r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: 0, softcap };
    let (a, b) = (
        r::attention_forward(&q, &k, &v, &key_start, case(None)),
        r::attention_forward(&q, &k, &v, &key_start, case(Some(0.7))),
    );
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-2), "the soft cap changed nothing");
}

// ---- GPU kernels against the twins ----

/// Sums of n products in another order differ by about sqrt(n) ulps of the terms.
fn sum_tol(n: usize) -> f32 {
    2e-6 * (n as f32).sqrt()
}

/// In every family, and in tile128 on a device with 16 KiB of workgroup memory (every product
/// on tile64's blocks, each kernel held to that limit).
#[test]
fn matmul_backward_kernels_match_twins() {
    for ctx in gpus().into_iter().chain([common::small_workgroup_gpu()]) {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(m, n, k)) in
            [(1, 1, 8), (3, 65, 72), (5, 130, 64), (17, 9, 136), (70, 66, 80), (3, 64, 72), (70, 68, 80), (33, 36, 40)]
                .iter()
                .enumerate()
        {
            let s = i as u64;
            let dy = rand(m * n, 100 + s, 1.0);
            let w = rand(n * k, 200 + s, 0.5);
            // Dense, reading the dy columns [2, 2 + n) of a wider buffer, accumulating onto dx.
            // Two leading columns for odd cases (only the tiled kernels take those), four for even.
            let lead: &[f32] = if i % 2 == 0 { &[0.5, -0.5, 0.25, 2.0] } else { &[0.5, -0.5] };
            let wide: Vec<f32> = dy.chunks(n).flat_map(|row| lead.iter().chain(row.iter()).copied()).collect();
            let dx0 = rand(m * k, 300 + s, 1.0);
            let want: Vec<f32> =
                r::matmul_backward(&dy, &w, m, n, k).iter().zip(&dx0).map(|(g, d0)| d0 + 0.5 * g).collect();
            let (gb, wb, dxb) =
                (ctx.storage_from("dy", &wide), ctx.storage_from("w", &w), ctx.storage_from("dx", &dx0));
            let dyc = DyCols { buf: &gb, stride: n + lead.len(), col_offset: lead.len() };
            let out = OutCols::whole(k).scaled(0.5).accumulated();
            run(&ctx, |enc| {
                launch::matmul_backward(
                    &ctx,
                    enc,
                    launch::MatmulGrad { dy: dyc, w: Weight::Dense(&wb), dx: &dxb, m, n, k, out },
                )
            });
            let got = ctx.read_f32(&dxb, m * k).expect("read");
            assert_close(&format!("matmul_backward dense {m}x{n}x{k}"), &got, &want, 1e-5, sum_tol(n));

            // NF4: against the twin on the dequantized weight (within the f16 bound where the
            // product runs on coop16).
            let q = nf4::quantize(&w, &[n, k], 64).expect("quantize");
            let wd = q.dequantize();
            let want = r::matmul_backward(&dy, &wd, m, n, k);
            let slack = f16_slack(f16_products(&ctx), (m, k, n), 1.0, |r, j| dy[r * n + j], |c, j| wd[j * k + c]);
            let (pb, ab) = (ctx.storage_from("packed", &q.packed), ctx.storage_from("absmax", &q.absmax));
            let gb = ctx.storage_from("dy", &dy);
            let dxb = ctx.storage_zeroed("dx", m * k);
            let w4 = Weight::Nf4 { packed: &pb, absmax: &ab, block_size: 64 };
            run(&ctx, |enc| {
                launch::matmul_backward(
                    &ctx,
                    enc,
                    launch::MatmulGrad { dy: DyCols::whole(&gb, n), w: w4, dx: &dxb, m, n, k, out: OutCols::whole(k) },
                )
            });
            let got = ctx.read_f32(&dxb, m * k).expect("read");
            assert_close_slack(&format!("matmul_nf4_backward {m}x{n}x{k}"), &got, &want, 1e-5, sum_tol(n), &slack);

            // GGUF Q4_0 and Q4_1 as stored: against the twin on ggml's dequantized values.
            if (n * k).is_multiple_of(32) {
                use edgetune::quant::gguf_blocks::{self, GgmlType};
                let q4_0 = gguf_blocks::quantize(GgmlType::Q4_0, &w).expect("quantize");
                let q4_1 = common::q4_1_blocks(n * k, 400 + s);
                for (ty, blocks) in [(GgmlType::Q4_0, q4_0), (GgmlType::Q4_1, q4_1)] {
                    let wd = gguf_blocks::dequantize(ty, &blocks, n * k).expect("dequantize");
                    let (packed, coeffs) = match ty {
                        GgmlType::Q4_0 => gguf_blocks::q4_0_repacked(&blocks, n * k),
                        _ => gguf_blocks::q4_1_repacked(&blocks, n * k),
                    }
                    .expect("repack");
                    let want = r::matmul_backward(&dy, &wd, m, n, k);
                    let slack =
                        f16_slack(f16_products(&ctx), (m, k, n), 1.0, |r, j| dy[r * n + j], |c, j| wd[j * k + c]);
                    let (pb, cb) = (ctx.storage_from("packed", &packed), ctx.storage_from("coeffs", &coeffs));
                    let w4 = match ty {
                        GgmlType::Q4_0 => Weight::Q4_0 { packed: &pb, scales: &cb },
                        _ => Weight::Q4_1 { packed: &pb, coeffs: &cb, block_size: launch::Q4_0_BLOCK },
                    };
                    let grad = launch::MatmulGrad {
                        dy: DyCols::whole(&gb, n),
                        w: w4,
                        dx: &dxb,
                        m,
                        n,
                        k,
                        out: OutCols::whole(k),
                    };
                    run(&ctx, |enc| launch::matmul_backward(&ctx, enc, grad));
                    let got = ctx.read_f32(&dxb, m * k).expect("read");
                    let what = format!("matmul_{}_backward {m}x{n}x{k}", ty.name());
                    assert_close_slack(&what, &got, &want, 1e-5, sum_tol(n), &slack);
                }
            }

            // f16 pairs: against the twin on the rounded weight.
            let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let wr: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let want = r::matmul_backward(&dy, &wr, m, n, k);
            let slack = f16_slack(f16_products(&ctx), (m, k, n), 1.0, |r, j| dy[r * n + j], |c, j| wr[j * k + c]);
            let whb = ctx.storage_from("w16", &wh);
            run(&ctx, |enc| {
                launch::matmul_backward(
                    &ctx,
                    enc,
                    launch::MatmulGrad {
                        dy: DyCols::whole(&gb, n),
                        w: Weight::F16(&whb),
                        dx: &dxb,
                        m,
                        n,
                        k,
                        out: OutCols::whole(k),
                    },
                )
            });
            let got = ctx.read_f32(&dxb, m * k).expect("read");
            assert_close_slack(&format!("matmul_f16_backward {m}x{n}x{k}"), &got, &want, 1e-5, sum_tol(n), &slack);

            // Weight gradient into a flat buffer at an offset, accumulated twice.
            let x = rand(m * k, 400 + s, 1.0);
            let off = 5;
            let xb = ctx.storage_from("x", &x);
            let flat = ctx.storage_zeroed("flat grads", off + n * k + 3);
            run(&ctx, |enc| {
                let g = launch::WeightGrad {
                    dy: &gb,
                    x: &xb,
                    dw: &flat,
                    dw_offset: off,
                    m,
                    n,
                    k,
                    alpha: 2.0,
                    accumulate: true,
                };
                launch::matmul_backward_w(&ctx, enc, g)?;
                launch::matmul_backward_w(&ctx, enc, launch::WeightGrad { alpha: 1.0, ..g })
            });
            let got = ctx.read_f32(&flat, off + n * k + 3).expect("read");
            let want: Vec<f32> = r::matmul_backward_w(&dy, &x, m, n, k).iter().map(|g| 3.0 * g).collect();
            assert_eq!(&got[..off], &[0.0; 5], "matmul_backward_w wrote before its offset");
            assert_eq!(&got[off + n * k..], &[0.0; 3], "matmul_backward_w wrote past its slice");
            assert_close(
                &format!("matmul_backward_w {m}x{n}x{k}"),
                &got[off..off + n * k],
                &want,
                1e-5,
                3.0 * sum_tol(m),
            );
        }
    }
}

/// The input gradient through GGUF's 5-, 6- and 8-bit types held as two 4-bit planes: two
/// backward matmuls, the second added to the first's output, each scaled; the first replaces
/// what dx held, or adds to it when the caller asks (every other case). Against the twin on ggml's dequantized values; where
/// products run in f16 (coop16) each plane is rounded on its own (|hi| + |lo| a weight).
#[test]
fn matmul_backward_over_two_planes_matches_twin() {
    use edgetune::quant::gguf_blocks::{self, GgmlType};
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        let types = [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q5K, GgmlType::Q6K];
        let shapes = [(1, 2, 256), (70, 66, 512), (33, 36, 256)];
        for (i, (ty, &(m, n, k))) in types.iter().flat_map(|t| shapes.iter().map(move |s| (*t, s))).enumerate() {
            let s = i as u64;
            let dy = rand(m * n, 500 + s, 1.0);
            let dx0 = rand(m * k, 600 + s, 1.0);
            let blocks = common::planes_blocks(ty, n * k, 700 + s, 0.3);
            let wd = gguf_blocks::dequantize(ty, &blocks, n * k).expect("dequantize");
            let planes = common::PlanesOnGpu::new(&ctx, ty, &blocks, n * k);
            let add = i % 2 == 0;
            let want: Vec<f32> = r::matmul_backward(&dy, &wd, m, n, k)
                .iter()
                .zip(&dx0)
                .map(|(g, d0)| if add { d0 + 0.5 * g } else { 0.5 * g })
                .collect();
            let mass = &planes.mass;
            let slack = f16_slack(f16_products(&ctx), (m, k, n), 0.5, |r, j| dy[r * n + j], |c, j| mass[j * k + c]);
            let (gb, dxb) = (ctx.storage_from("dy", &dy), ctx.storage_from("dx", &dx0));
            let out = OutCols::whole(k).scaled(0.5);
            let out = if add { out.accumulated() } else { out };
            let grad = launch::MatmulGrad { dy: DyCols::whole(&gb, n), w: planes.weight(), dx: &dxb, m, n, k, out };
            run(&ctx, |enc| launch::matmul_backward(&ctx, enc, grad));
            let got = ctx.read_f32(&dxb, m * k).expect("read");
            let what = format!("matmul_{}_backward {m}x{n}x{k}", ty.name());
            assert_close_slack(&what, &got, &want, 1e-5, sum_tol(n), &slack);
        }
    }
}

#[test]
fn lora_forward_through_a_flat_buffer_matches_twin() {
    // y = base + alpha * (x A^T) B^T with A and B at offsets of one flat buffer.
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        let (m, n, k, rank) = (5, 12, 24, 4);
        let x = rand(m * k, 21, 1.0);
        let (a, b) = (rand(rank * k, 22, 0.5), rand(n * rank, 23, 0.5));
        let base = rand(m * n, 24, 1.0);
        let mut flat = vec![9.0f32; 3];
        flat.extend(&a);
        flat.extend(&b);
        let (a_off, b_off) = (3, 3 + rank * k);
        let h = r::matmul_forward(&x, &a, None, m, rank, k);
        let (xb, fb, yb, hb) = (
            ctx.storage_from("x", &x),
            ctx.storage_from("flat", &flat),
            ctx.storage_from("y", &base),
            ctx.storage_zeroed("h", m * rank),
        );
        run(&ctx, |enc| {
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul {
                    x: &xb,
                    w: Weight::DenseAt(&fb, a_off),
                    bias: None,
                    y: &hb,
                    m,
                    n: rank,
                    k,
                    out: OutCols::whole(rank),
                },
            )?;
            let out = OutCols::whole(n).scaled(0.25).accumulated();
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &hb, w: Weight::DenseAt(&fb, b_off), bias: None, y: &yb, m, n, k: rank, out },
            )
        });
        // h against its twin; y against the twin of its own product on the h the GPU made (on
        // coop16 both are f16 products with their own bounds).
        let on = f16_products(&ctx);
        let slack = f16_slack(on, (m, rank, k), 1.0, |r, j| x[r * k + j], |c, j| a[c * k + j]);
        let h_gpu = ctx.read_f32(&hb, m * rank).expect("read");
        assert_close_slack("lora forward h", &h_gpu, &h, 1e-5, sum_tol(k), &slack);
        let want: Vec<f32> =
            r::matmul_forward(&h_gpu, &b, None, m, n, rank).iter().zip(&base).map(|(l, y0)| y0 + 0.25 * l).collect();
        let slack = f16_slack(on, (m, n, rank), 0.25, |r, j| h_gpu[r * rank + j], |c, j| b[c * rank + j]);
        let got = ctx.read_f32(&yb, m * n).expect("read");
        assert_close_slack("lora forward", &got, &want, 1e-5, sum_tol(k), &slack);
    }
}

/// The narrow products a LoRA step is made of, in every family, for ranks 1, 8, 16 and 64 and
/// 1 or 2,049 tokens: h = x A^T, y += s h B^T, dh = dy B, dx += dh A, dB = dy^T h and
/// dA = dh^T x, with A and B at offsets of one flat buffer and their gradients at offsets of
/// another. K = 200 is not a multiple of any tile's reduction step, N = 136 not of any tile's
/// width, and 2,049 rows leave a partial tile (and split reductions for the weight gradients).
#[test]
fn lora_shaped_products_match_twins_in_every_family() {
    let (n, k) = (136, 200);
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        for (i, &(t, rank)) in
            [(1, 1), (2049, 1), (1, 8), (2049, 8), (2049, 16), (1, 16), (2049, 64), (1, 64)].iter().enumerate()
        {
            let s = 50 * i as u64;
            let (x, dy, a, b) = (
                rand(t * k, s + 1, 1.0),
                rand(t * n, s + 2, 1.0),
                rand(rank * k, s + 3, 0.5),
                rand(n * rank, s + 4, 0.5),
            );
            let (h, y0, dx0) = (rand(t * rank, s + 5, 1.0), rand(t * n, s + 6, 1.0), rand(t * k, s + 7, 1.0));
            let dh = rand(t * rank, s + 8, 1.0);
            let (a_off, b_off) = (7, 7 + rank * k);
            let flat: Vec<f32> = [vec![3.0; 7], a.clone(), b.clone()].concat();
            let fb = ctx.storage_from("flat", &flat);
            let (xb, dyb, hb, dhb) = (
                ctx.storage_from("x", &x),
                ctx.storage_from("dy", &dy),
                ctx.storage_from("h", &h),
                ctx.storage_from("dh", &dh),
            );
            let (h_out, y, dh_out, dx) = (
                ctx.storage_zeroed("h out", t * rank),
                ctx.storage_from("y", &y0),
                ctx.storage_zeroed("dh out", t * rank),
                ctx.storage_from("dx", &dx0),
            );
            let grads = ctx.storage_zeroed("grads", 7 + rank * k + n * rank);
            run(&ctx, |enc| {
                let (a_w, b_w) = (Weight::DenseAt(&fb, a_off), Weight::DenseAt(&fb, b_off));
                let mm = |x, w, y, (m, n, k), out| launch::Matmul { x, w, bias: None, y, m, n, k, out };
                launch::matmul_forward(&ctx, enc, mm(&xb, a_w, &h_out, (t, rank, k), OutCols::whole(rank)))?;
                let add = OutCols::whole(n).scaled(2.0).accumulated();
                launch::matmul_forward(&ctx, enc, mm(&hb, b_w, &y, (t, n, rank), add))?;
                let dh_cols = DyCols::whole(&dyb, n);
                let g = launch::MatmulGrad {
                    dy: dh_cols,
                    w: b_w,
                    dx: &dh_out,
                    m: t,
                    n,
                    k: rank,
                    out: OutCols::whole(rank),
                };
                launch::matmul_backward(&ctx, enc, g)?;
                let out = OutCols::whole(k).accumulated();
                let g = launch::MatmulGrad { dy: DyCols::whole(&dhb, rank), w: a_w, dx: &dx, m: t, n: rank, k, out };
                launch::matmul_backward(&ctx, enc, g)?;
                let wg = |dy, x, dw_offset, (n, k)| launch::WeightGrad {
                    dy,
                    x,
                    dw: &grads,
                    dw_offset,
                    m: t,
                    n,
                    k,
                    alpha: 0.5,
                    accumulate: false,
                };
                launch::matmul_backward_w(&ctx, enc, wg(&dyb, &hb, b_off, (n, rank)))?;
                launch::matmul_backward_w(&ctx, enc, wg(&dhb, &xb, a_off, (rank, k)))
            });
            let what = |op: &str| format!("{op} T {t} r {rank} ({})", ctx.report.kernels.family);
            let read = |b: &wgpu::Buffer, len| ctx.read_f32(b, len).expect("read");
            let on = f16_products(&ctx);
            let slack = f16_slack(on, (t, rank, k), 1.0, |r, j| x[r * k + j], |c, j| a[c * k + j]);
            let want = r::matmul_forward(&x, &a, None, t, rank, k);
            assert_close_slack(&what("x A^T"), &read(&h_out, t * rank), &want, 1e-5, sum_tol(k), &slack);
            let want: Vec<f32> =
                r::matmul_forward(&h, &b, None, t, n, rank).iter().zip(&y0).map(|(l, y0)| y0 + 2.0 * l).collect();
            let slack = f16_slack(on, (t, n, rank), 2.0, |r, j| h[r * rank + j], |c, j| b[c * rank + j]);
            assert_close_slack(&what("y += s h B^T"), &read(&y, t * n), &want, 1e-5, sum_tol(rank), &slack);
            assert_close(
                &what("dy B"),
                &read(&dh_out, t * rank),
                &r::matmul_backward(&dy, &b, t, n, rank),
                1e-5,
                sum_tol(n),
            );
            let want: Vec<f32> = r::matmul_backward(&dh, &a, t, rank, k).iter().zip(&dx0).map(|(g, d)| d + g).collect();
            assert_close(&what("dx += dh A"), &read(&dx, t * k), &want, 1e-5, sum_tol(rank));
            let got = read(&grads, 7 + rank * k + n * rank);
            assert_eq!(&got[..7], &[0.0; 7], "{}: a gradient landed before its offset", what("dW"));
            let half = |g: Vec<f32>| -> Vec<f32> { g.iter().map(|v| 0.5 * v).collect() };
            let want = half(r::matmul_backward_w(&dy, &h, t, n, rank));
            assert_close(&what("dB"), &got[b_off..], &want, 1e-5, sum_tol(t));
            let want = half(r::matmul_backward_w(&dh, &x, t, rank, k));
            assert_close(&what("dA"), &got[a_off..b_off], &want, 1e-5, sum_tol(t));
        }
    }
}

#[test]
fn cross_entropy_backward_kernel_matches_twin() {
    let ctx = gpu();
    let (rows, vocab) = (4, 1001);
    let logits = rand(rows * vocab, 31, 8.0);
    let targets = vec![3u32, u32::MAX, 1000, 0];
    let (want_loss, want_grad) = r::cross_entropy_backward(&logits, &targets, vocab, 1.0 / 3.0);
    let (lb, tb, out) =
        (ctx.storage_from("logits", &logits), ctx.storage_from("targets", &targets), ctx.storage_zeroed("loss", rows));
    run(&ctx, |enc| {
        launch::cross_entropy_backward(
            &ctx,
            enc,
            launch::CrossEntropy { logits: &lb, targets: &tb, loss: &out, n_rows: rows, vocab, softcap: None },
            1.0 / 3.0,
        )
    });
    assert_close("cross_entropy_backward loss", &ctx.read_f32(&out, rows).expect("read"), &want_loss, 1e-5, 1e-5);
    // Probabilities are at most 1; exp and the reduction order give a few ulps.
    assert_close(
        "cross_entropy_backward dlogits",
        &ctx.read_f32(&lb, rows * vocab).expect("read"),
        &want_grad,
        1e-5,
        1e-7,
    );

    // Gemma 2's final soft cap (30, as Gemma 2's; these logits reach 8): logit_softcap.wgsl
    // caps in place, and the backward multiplies by the cap's derivative.
    let cap = 30.0;
    let z = r::logit_softcap(&logits, cap);
    let (want_loss, dz) = r::cross_entropy_backward(&z, &targets, vocab, 1.0 / 3.0);
    let want_grad = r::logit_softcap_backward(&dz, &z, cap);
    let lb = ctx.storage_from("logits", &logits);
    run(&ctx, |enc| {
        launch::logit_softcap(&ctx, enc, &lb, rows * vocab, cap)?;
        let ce =
            launch::CrossEntropy { logits: &lb, targets: &tb, loss: &out, n_rows: rows, vocab, softcap: Some(cap) };
        launch::cross_entropy_backward(&ctx, enc, ce, 1.0 / 3.0)
    });
    assert_close("capped cross_entropy loss", &ctx.read_f32(&out, rows).expect("read"), &want_loss, 1e-5, 1e-5);
    let got = ctx.read_f32(&lb, rows * vocab).expect("read");
    assert_close("capped cross_entropy dlogits", &got, &want_grad, 1e-5, 1e-7);
    assert!(got.iter().zip(&dz).any(|(a, b)| (a - b).abs() > 1e-4), "the cap's derivative changed nothing");
}

#[test]
fn rms_norm_rope_silu_gelu_backward_kernels_match_twins() {
    let ctx = gpu();
    for &(rows, dim) in &[(1, 1), (3, 65), (7, 200)] {
        let x = rand(rows * dim, 41, 2.0);
        let w = rand(dim, 42, 1.0);
        let dy = rand(rows * dim, 43, 1.0);
        let dx0 = rand(rows * dim, 44, 1.0);
        let want: Vec<f32> = r::rms_norm_backward(&x, &w, &dy, 1e-5).iter().zip(&dx0).map(|(g, d)| g + d).collect();
        let (xb, wb, gb, dxb) = (
            ctx.storage_from("x", &x),
            ctx.storage_from("w", &w),
            ctx.storage_from("dy", &dy),
            ctx.storage_from("dx", &dx0),
        );
        run(&ctx, |enc| {
            launch::rms_norm_backward(
                &ctx,
                enc,
                launch::RmsNormGrad { x: &xb, w: &wb, dy: &gb, dx: &dxb, n_rows: rows, dim, eps: 1e-5 },
            )
        });
        assert_close(
            &format!("rms_norm_backward {rows}x{dim}"),
            &ctx.read_f32(&dxb, rows * dim).expect("read"),
            &want,
            1e-5,
            1e-5,
        );
        // The pair variant: this tensor and another of more rows with its own weight, in one
        // dispatch, each added to its dx as its twin gives it alone.
        let (x2, w2, dy2, dx2) = (
            rand((rows + 2) * dim, 45, 3.0),
            rand(dim, 46, 1.0),
            rand((rows + 2) * dim, 47, 1.0),
            rand((rows + 2) * dim, 48, 1.0),
        );
        let want2: Vec<f32> = r::rms_norm_backward(&x2, &w2, &dy2, 1e-5).iter().zip(&dx2).map(|(g, d)| g + d).collect();
        let [x2b, w2b, g2b, dx2b] =
            [(&x2, "x2"), (&w2, "w2"), (&dy2, "dy2"), (&dx2, "dx2")].map(|(v, n)| ctx.storage_from(n, v));
        let dxa = ctx.storage_from("dx", &dx0);
        let a = launch::RmsNormGrad { x: &xb, w: &wb, dy: &gb, dx: &dxa, n_rows: rows, dim, eps: 1e-5 };
        let b = launch::RmsNormGrad { x: &x2b, w: &w2b, dy: &g2b, dx: &dx2b, n_rows: rows + 2, ..a };
        let dispatches = run(&ctx, |enc| launch::rms_norm_pair_backward(&ctx, enc, [a, b]));
        assert_eq!(dispatches, 1, "one dispatch for both");
        let got = (ctx.read_f32(&dxa, rows * dim).expect("read"), ctx.read_f32(&dx2b, (rows + 2) * dim).expect("read"));
        assert_close(&format!("rms_norm_backward pair, first {rows}x{dim}"), &got.0, &want, 1e-5, 1e-5);
        assert_close(&format!("rms_norm_backward pair, second {rows}x{dim}"), &got.1, &want2, 1e-5, 1e-5);
        let mut enc = ctx.encoder();
        let err = launch::rms_norm_pair_backward(&ctx, &mut enc, [a, launch::RmsNormGrad { dim: dim + 1, ..a }])
            .expect_err("widths differ")
            .to_string();
        assert!(err.contains("width"), "{err}");

        let (dg, du) = (ctx.storage_zeroed("dgate", rows * dim), ctx.storage_zeroed("dup", rows * dim));
        let ub = ctx.storage_from("up", &dx0);
        run(&ctx, |enc| {
            launch::silu_mul_backward(
                &ctx,
                enc,
                launch::SiluMulGrad { gate: &xb, up: &ub, dout: &gb, dgate: &dg, dup: &du, n: rows * dim },
            )
        });
        let (want_g, want_u) = r::silu_mul_backward(&x, &dx0, &dy);
        assert_close("silu_mul_backward dgate", &ctx.read_f32(&dg, rows * dim).expect("read"), &want_g, 1e-5, 1e-6);
        assert_close("silu_mul_backward dup", &ctx.read_f32(&du, rows * dim).expect("read"), &want_u, 1e-5, 1e-6);

        run(&ctx, |enc| {
            launch::gelu_mul_backward(
                &ctx,
                enc,
                launch::SiluMulGrad { gate: &xb, up: &ub, dout: &gb, dgate: &dg, dup: &du, n: rows * dim },
            )
        });
        let (want_g, want_u) = r::gelu_mul_backward(&x, &dx0, &dy);
        assert_close("gelu_mul_backward dgate", &ctx.read_f32(&dg, rows * dim).expect("read"), &want_g, 1e-5, 1e-6);
        assert_close("gelu_mul_backward dup", &ctx.read_f32(&du, rows * dim).expect("read"), &want_u, 1e-5, 1e-6);
    }
    for &(t, (h, kv), hd, rd) in &[(1, (1, 1), 2, 2), (5, (3, 1), 64, 64), (4, (2, 2), 130, 130), (3, (2, 1), 128, 96)]
    {
        let inv: Vec<f32> = (0..rd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rd as f32)).collect();
        let table = r::rope_table(&inv, 50);
        let positions: Vec<u32> = (0..t as u32).map(|i| (i * 7) % 5).collect();
        let abs_pos: Vec<usize> = positions.iter().map(|&p| p as usize + 3).collect();
        let (dq, dk) = (rand(t * h * hd, 45, 1.0), rand(t * kv * hd, 46, 1.0));
        let (mut want_q, mut want_k) = (dq.clone(), dk.clone());
        r::rope_backward(&mut want_q, &table, h, (hd, rd), &abs_pos);
        r::rope_backward(&mut want_k, &table, kv, (hd, rd), &abs_pos);
        let (qb, kb) = (ctx.storage_from("dq", &dq), ctx.storage_from("dk", &dk));
        let (tb, pb) = (ctx.storage_from("cos_sin", &table), ctx.storage_from("pos", &positions));
        let shape = RopeShape {
            n_tokens: t,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            rot_dim: rd,
            pos_offset: 3,
            positions: &pb,
        };
        run(&ctx, |enc| launch::rope_backward(&ctx, enc, [&qb, &kb], &tb, shape));
        assert_close("rope_backward dq", &ctx.read_f32(&qb, dq.len()).expect("read"), &want_q, 1e-6, 1e-6);
        assert_close("rope_backward dk", &ctx.read_f32(&kb, dk.len()).expect("read"), &want_k, 1e-6, 1e-6);
    }
}

/// The blocked attention's backward passes combine rows over as many lanes as the subgroup
/// has, read at run time (`common/attention_rows.wgsl`), where lavapipe's subgroups have 8: the
/// test below again with subgroups of 4 lanes and, on a CPU with AVX-512, 16.
#[test]
fn attention_backward_kernels_match_twin_with_subgroups_of_4_and_16_lanes() {
    for lanes in common::other_subgroup_sizes(&gpus()[0]) {
        common::rerun_with_subgroups_of("attention_backward_kernels_match_twin_on_packed_batches", lanes);
    }
}

#[test]
fn attention_backward_kernels_match_twin_on_packed_batches() {
    // And tile128 with its default small-grid threshold, under which GQA's dK/dV pass runs a
    // workgroup per query head into partials and a second pass adds them (the other contexts
    // force 0, a workgroup per kv head walking its query heads, but for tile64's, whose threshold
    // splits every grid), with and without subgroup operations (the blocked kernels' .shared
    // twins reduce rows in workgroup memory alone).
    let split = |no_subgroups| {
        let opts = GpuOptions { kernels: Some(KernelFamily::Tile128), no_subgroups, ..Default::default() };
        let ctx = GpuContext::new(&opts).expect("tile128");
        assert_eq!(ctx.report.subgroups, !no_subgroups && gpu().report.subgroups);
        ctx
    };
    for ctx in gpus().into_iter().chain([split(false), split(true)].map(std::sync::Arc::new)) {
        let k = &ctx.report.kernels;
        let must_split = k.attention == KernelFamily::Tile128 && k.tile128_min_groups > 0;
        let mut splits = 0;
        // (segment lengths, heads, kv heads, head_dim): more than 64 tokens so tiles and the early
        // stop of the key pass are exercised; 140 tokens over three blocks of 64 with a head of
        // 128 dims, whose second half the blocked kernels keep apart; heads of 130, 200 and 256
        // dims (Gemma's), which they take 128 dims at a time.
        // Cases 0, 2 and 4 with Gemma 2's soft cap, at 0.3: these scores (standard deviation
        // 1/3) reach about 1.5, so the cap bends them.
        for (i, (segs, h, kvh, hd)) in [
            (vec![1], 1, 1, 8),
            (vec![3, 2], 4, 2, 16),
            (vec![70, 5, 20], 2, 1, 64),
            (vec![9], 3, 3, 130),
            (vec![6, 11, 4], 6, 2, 96),
            (vec![100, 40], 2, 1, 128),
            (vec![70, 10], 4, 2, 256),
            (vec![3, 66], 2, 1, 200),
        ]
        .into_iter()
        .enumerate()
        {
            let softcap = (i % 2 == 0).then_some(0.3);
            let case = r::AttentionCase { n_heads: h, n_kv_heads: kvh, head_dim: hd, pos_offset: 0, softcap };
            let t: usize = segs.iter().sum();
            let mut key_start = Vec::new();
            for &len in &segs {
                let first = key_start.len();
                key_start.extend(std::iter::repeat_n(first, len));
            }
            let q = rand(t * h * hd, 51, 1.0);
            let k = rand(t * kvh * hd, 52, 1.0);
            let v = rand(t * kvh * hd, 53, 1.0);
            let dout = rand(q.len(), 54, 1.0);
            let want_out = r::attention_forward(&q, &k, &v, &key_start, case);
            let (want_dq, want_dk, want_dv) = r::attention_backward(&q, &k, &v, &key_start, &dout, case);
            let ks: Vec<u32> = key_start.iter().map(|&s| s as u32).collect();
            let (qb, kb, vb, ksb) = (
                ctx.storage_from("q", &q),
                ctx.storage_from("k", &k),
                ctx.storage_from("v", &v),
                ctx.storage_from("ks", &ks),
            );
            let (out, stats, gb) = (
                ctx.storage_zeroed("out", q.len()),
                ctx.storage_zeroed("stats", 2 * t * h),
                ctx.storage_from("dout", &dout),
            );
            let (dq, dk, dv) = (
                ctx.storage_zeroed("dq", q.len()),
                ctx.storage_zeroed("dk", k.len()),
                ctx.storage_zeroed("dv", v.len()),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let s = AttentionShape {
                n_tokens: t,
                n_heads: h,
                n_kv_heads: kvh,
                head_dim: hd,
                pos_offset: 0,
                key_base: 0,
                scale,
                softcap,
            };
            let dispatches = run(&ctx, |enc| {
                let fwd = launch::AttentionIo { q: &qb, k: &kb, v: &vb, key_start: &ksb, out: &out, stats: &stats };
                launch::attention_forward(&ctx, enc, fwd, s)?;
                let b = AttentionGrads { fwd, dout: &gb, dq: &dq, dk: &dk, dv: &dv };
                launch::attention_backward(&ctx, enc, b, s)
            });
            let label = format!("attention t{t} segs {segs:?} h{h}/{kvh} hd{hd} cap {softcap:?}");
            // Forward, dQ and dK/dV, and the pass that adds the query heads' shares when split.
            let blocked = ctx.report.kernels.attention == KernelFamily::Tile128;
            let split = blocked && launch::head_split(&ctx, s);
            splits += usize::from(split);
            assert_eq!(dispatches, 3 + u64::from(split), "{label}: dispatches");
            // Dot products of hd terms and softmax sums over up to T keys, in another order.
            let tol = sum_tol(hd.max(t)) * 4.0;
            assert_close(&format!("{label} out"), &ctx.read_f32(&out, q.len()).expect("read"), &want_out, 1e-4, tol);
            assert_close(&format!("{label} dq"), &ctx.read_f32(&dq, q.len()).expect("read"), &want_dq, 1e-4, tol);
            assert_close(&format!("{label} dk"), &ctx.read_f32(&dk, k.len()).expect("read"), &want_dk, 1e-4, tol);
            assert_close(&format!("{label} dv"), &ctx.read_f32(&dv, v.len()).expect("read"), &want_dv, 1e-4, tol);
        }
        assert_eq!(splits > 0, must_split, "{}: {splits} cases split by query head", ctx.report.kernels);
    }
}

/// The rule that splits long reductions of small output grids (tiled kernels only).
#[test]
fn split_reductions_follow_their_rule() {
    assert_eq!(launch::split_of(2, 600), (4, 160), "2 workgroups, K 600: four slices of 160");
    assert_eq!(launch::split_of(512, 100_000), (1, 0), "a grid that fills the GPU is not split");
    assert_eq!(launch::split_of(1, 255), (1, 0), "slices shorter than 128 are not made");
    for groups in [1, 3, 8, 100, 300, 511] {
        for red in [256, 300, 1000, 2048, 8192, 128_256] {
            let (splits, slice) = launch::split_of(groups, red);
            if splits > 1 {
                assert!(slice % 16 == 0 && slice >= 128, "{groups} {red}: slice {slice}");
                assert!(splits * slice >= red && (splits - 1) * slice < red, "{groups} {red}: {splits} x {slice}");
                assert!(splits <= 64 && groups * splits < 512 + groups, "{groups} {red}: {splits}");
            }
        }
    }
}

/// Small output grids with long reductions run as slices plus a reduction pass on the tiled
/// kernels: forward (dense with bias into columns of a wider output, accumulated; NF4; f16),
/// input gradient (dense from dy columns, NF4) and weight gradient (at an offset, accumulated
/// twice), each against its twin and each recorded as two dispatches.
#[test]
fn long_reductions_split_over_workgroups_and_match_twins() {
    let tiled: Vec<_> = gpus().into_iter().filter(|c| c.report.kernels.family != KernelFamily::Simd8).collect();
    assert!(!tiled.is_empty(), "one context runs the tiled kernels");
    for ctx in tiled {
        let dispatches = |f: &dyn Fn(&mut edgetune::gpu::Encoder) -> edgetune::Result<()>| run(&ctx, f);
        // Forward, dense: y[:, 3..3 + n] of a (m, n + 5) buffer = y0 + 0.5 x W^T + b.
        let (m, n, k) = (5, 70, 600);
        let (x, w, b) = (rand(m * k, 1, 1.0), rand(n * k, 2, 0.5), rand(n, 3, 0.5));
        let y0 = rand(m * (n + 5), 4, 1.0);
        let xw = r::matmul_forward(&x, &w, None, m, n, k);
        let mut want = y0.clone();
        for i in 0..m {
            for j in 0..n {
                want[i * (n + 5) + 3 + j] += 0.5 * xw[i * n + j] + b[j];
            }
        }
        let (xb, wb, bb, yb) = (
            ctx.storage_from("x", &x),
            ctx.storage_from("w", &w),
            ctx.storage_from("b", &b),
            ctx.storage_from("y", &y0),
        );
        let out = OutCols::at(n + 5, 3).scaled(0.5).accumulated();
        let d = dispatches(&|enc| {
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &xb, w: Weight::Dense(&wb), bias: Some(&bb), y: &yb, m, n, k, out },
            )
        });
        assert_eq!(d, 2, "split forward: slices, then the reduction");
        let got = ctx.read_f32(&yb, m * (n + 5)).expect("read");
        let on = f16_products(&ctx);
        let product = f16_slack(on, (m, n, k), 0.5, |r, j| x[r * k + j], |c, j| w[c * k + j]);
        // The same bounds laid out as y, nothing beside the columns written.
        let slack: Vec<f32> =
            if on.f16() {
                (0..m * (n + 5))
                    .map(|i| {
                        if (3..3 + n).contains(&(i % (n + 5))) {
                            product[i / (n + 5) * n + i % (n + 5) - 3]
                        } else {
                            0.0
                        }
                    })
                    .collect()
            } else {
                vec![]
            };
        assert_close_slack("split matmul dense", &got, &want, 1e-5, sum_tol(k), &slack);

        // Forward, NF4 and f16 weights.
        let (m, n, k) = (6, 40, 640);
        let x = rand(m * k, 5, 1.0);
        let q = nf4::quantize(&rand(n * k, 6, 0.3), &[n, k], 64).expect("quantize");
        let wd = q.dequantize();
        let want = r::matmul_forward(&x, &wd, None, m, n, k);
        let (xb, pb, ab) =
            (ctx.storage_from("x", &x), ctx.storage_from("p", &q.packed), ctx.storage_from("a", &q.absmax));
        let yb = ctx.storage_zeroed("y", m * n);
        let w4 = Weight::Nf4 { packed: &pb, absmax: &ab, block_size: 64 };
        let d = dispatches(&|enc| {
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &xb, w: w4, bias: None, y: &yb, m, n, k, out: OutCols::whole(n) },
            )
        });
        assert_eq!(d, 2);
        let slack = f16_slack(on, (m, n, k), 1.0, |r, j| x[r * k + j], |c, j| wd[c * k + j]);
        let got = ctx.read_f32(&yb, m * n).expect("read");
        assert_close_slack("split matmul_nf4", &got, &want, 1e-5, sum_tol(k), &slack);
        let wh: Vec<half::f16> = rand(n * k, 7, 0.5).iter().map(|&v| half::f16::from_f32(v)).collect();
        let wr: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
        let want = r::matmul_forward(&x, &wr, None, m, n, k);
        let whb = ctx.storage_from("w16", &wh);
        let d = dispatches(&|enc| {
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &xb, w: Weight::F16(&whb), bias: None, y: &yb, m, n, k, out: OutCols::whole(n) },
            )
        });
        assert_eq!(d, 2);
        let slack = f16_slack(on, (m, n, k), 1.0, |r, j| x[r * k + j], |c, j| wr[c * k + j]);
        let got = ctx.read_f32(&yb, m * n).expect("read");
        assert_close_slack("split matmul_f16", &got, &want, 1e-5, sum_tol(k), &slack);

        // Input gradient: the reduction runs over N.
        let (m, n, k) = (4, 700, 72);
        let dy = rand(m * n, 8, 1.0);
        let w = rand(n * k, 9, 0.5);
        let wide: Vec<f32> = dy.chunks(n).flat_map(|row| [0.5, -0.5].iter().chain(row.iter()).copied()).collect();
        let dx0 = rand(m * k, 10, 1.0);
        let want: Vec<f32> =
            r::matmul_backward(&dy, &w, m, n, k).iter().zip(&dx0).map(|(g, d0)| d0 + 2.0 * g).collect();
        let (gb, wb, dxb) = (ctx.storage_from("dy", &wide), ctx.storage_from("w", &w), ctx.storage_from("dx", &dx0));
        let dyc = DyCols { buf: &gb, stride: n + 2, col_offset: 2 };
        let out = OutCols::whole(k).scaled(2.0).accumulated();
        let d = dispatches(&|enc| {
            launch::matmul_backward(
                &ctx,
                enc,
                launch::MatmulGrad { dy: dyc, w: Weight::Dense(&wb), dx: &dxb, m, n, k, out },
            )
        });
        assert_eq!(d, 2);
        assert_close("split matmul_backward", &ctx.read_f32(&dxb, m * k).expect("read"), &want, 1e-5, 2.0 * sum_tol(n));
        let q = nf4::quantize(&w, &[n, k], 64).expect("quantize");
        let wd = q.dequantize();
        let want = r::matmul_backward(&dy, &wd, m, n, k);
        let (pb, ab, gb) =
            (ctx.storage_from("p", &q.packed), ctx.storage_from("a", &q.absmax), ctx.storage_from("dy", &dy));
        let dxb = ctx.storage_zeroed("dx", m * k);
        let w4 = Weight::Nf4 { packed: &pb, absmax: &ab, block_size: 64 };
        let d = dispatches(&|enc| {
            launch::matmul_backward(
                &ctx,
                enc,
                launch::MatmulGrad { dy: DyCols::whole(&gb, n), w: w4, dx: &dxb, m, n, k, out: OutCols::whole(k) },
            )
        });
        assert_eq!(d, 2);
        let slack = f16_slack(on, (m, k, n), 1.0, |r, j| dy[r * n + j], |c, j| wd[j * k + c]);
        let got = ctx.read_f32(&dxb, m * k).expect("read");
        assert_close_slack("split matmul_nf4_backward", &got, &want, 1e-5, sum_tol(n), &slack);

        // Weight gradient: the reduction runs over the M tokens.
        let (m, n, k) = (600, 9, 20);
        let (dy, x) = (rand(m * n, 11, 1.0), rand(m * k, 12, 1.0));
        let (gb, xb) = (ctx.storage_from("dy", &dy), ctx.storage_from("x", &x));
        let off = 5;
        let flat = ctx.storage_zeroed("flat grads", off + n * k + 3);
        let d = dispatches(&|enc| {
            let g = launch::WeightGrad {
                dy: &gb,
                x: &xb,
                dw: &flat,
                dw_offset: off,
                m,
                n,
                k,
                alpha: 2.0,
                accumulate: true,
            };
            launch::matmul_backward_w(&ctx, enc, g)?;
            launch::matmul_backward_w(&ctx, enc, launch::WeightGrad { alpha: 1.0, ..g })
        });
        assert_eq!(d, 4);
        let got = ctx.read_f32(&flat, off + n * k + 3).expect("read");
        let want: Vec<f32> = r::matmul_backward_w(&dy, &x, m, n, k).iter().map(|g| 3.0 * g).collect();
        assert_eq!(&got[..off], &[0.0; 5], "wrote before its offset");
        assert_eq!(&got[off + n * k..], &[0.0; 3], "wrote past its slice");
        assert_close("split matmul_backward_w", &got[off..off + n * k], &want, 1e-5, 3.0 * sum_tol(m));

        // A short reduction stays one dispatch.
        let (m, n, k) = (5, 70, 200);
        let (xb, wb) = (ctx.storage_from("x", &rand(m * k, 13, 1.0)), ctx.storage_from("w", &rand(n * k, 14, 0.5)));
        let yb = ctx.storage_zeroed("y", m * n);
        let d = dispatches(&|enc| {
            launch::matmul_forward(
                &ctx,
                enc,
                launch::Matmul { x: &xb, w: Weight::Dense(&wb), bias: None, y: &yb, m, n, k, out: OutCols::whole(n) },
            )
        });
        assert_eq!(d, 1);
    }
}

/// Three pairs packed in 150 rows (more than a workgroup's 64 threads for one completion), the
/// prompt rows scoring nothing, and the DPO losses TRL offers.
struct DpoCase {
    ce: Vec<f32>,
    spans: Vec<[u32; 6]>,
    reference: Vec<f32>,
    losses: Vec<(&'static str, r::DpoTwin)>,
}

fn dpo_case() -> DpoCase {
    // Completion rows [a, b) of chosen and rejected per pair; a row's cross-entropy is positive.
    let spans: Vec<[u32; 6]> = vec![[0, 20, 20, 31, 12, 4], [31, 110, 110, 118, 70, 6], [118, 121, 121, 150, 1, 20]];
    let mut ce: Vec<f32> = rand(150, 91, 1.0).iter().map(|v| v.abs() * 4.0).collect();
    // Rows before each completion's scored tokens score nothing (the prompt): cross-entropy 0.
    for s in &spans {
        for (a, b, n) in [(s[0], s[1], s[4]), (s[2], s[3], s[5])] {
            ce[a as usize..(b - n) as usize].fill(0.0);
        }
    }
    let reference: Vec<f32> = rand(6, 92, 1.0)
        .iter()
        .zip(&spans.iter().flat_map(|s| [s[4], s[5]]).collect::<Vec<_>>())
        .map(|(v, &n)| -(n as f32) * (2.0 + v))
        .collect();
    let e = 0.1;
    let losses = vec![
        ("sigmoid", r::DpoTwin { beta: 0.1, a: 1.0, b: 0.0, ipo: false, length_normalized: false }),
        (
            "robust",
            r::DpoTwin {
                beta: 0.1,
                a: (1.0 - e) / (1.0 - 2.0 * e),
                b: -e / (1.0 - 2.0 * e),
                ipo: false,
                length_normalized: false,
            },
        ),
        ("ipo", r::DpoTwin { beta: 0.1, a: 0.0, b: 0.0, ipo: true, length_normalized: true }),
        ("sigmoid beta 2", r::DpoTwin { beta: 2.0, a: 1.0, b: 0.0, ipo: false, length_normalized: false }),
    ];
    DpoCase { ce, spans, reference, losses }
}

#[test]
fn dpo_twin_weights_match_finite_differences_of_its_loss() {
    let DpoCase { ce, spans, reference, losses } = dpo_case();
    let grad_scale = 1.0 / 3.0;
    for (name, how) in losses {
        let (weights, _) = r::dpo_loss(&ce, &spans, &reference, how, grad_scale);
        let loss = |x: &[f32]| -> f64 {
            r::dpo_loss(x, &spans, &reference, how, grad_scale).1.iter().map(|s| s[0]).sum::<f64>() * grad_scale
        };
        // The twin runs in f64 on f32 inputs; the quotient divides by the step as the f32
        // inputs took it. Central differences are off by h^2 / 6 times the third derivative:
        // for the sigmoid family beta^3 (|a| + |b|) times at most 0.0962 (the largest |sigmoid''|),
        // times grad_scale; 0 for IPO's square. Plus f64 rounding of losses near 1 (1e-16 / h).
        let h = 1e-3f32;
        let third = if how.ipo { 0.0 } else { how.beta.powi(3) * (how.a.abs() + how.b.abs()) * 0.0962 };
        let tol = f64::from(h * h) / 6.0 * third * grad_scale + 1e-9;
        for i in 0..ce.len() {
            let (mut up, mut down) = (ce.clone(), ce.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / f64::from(up[i] - down[i]);
            assert!(
                (fd - weights[i]).abs() <= tol,
                "{name} row {i}: weight {} vs finite difference {fd} (tolerance {tol:e})",
                weights[i]
            );
        }
    }
}

#[test]
fn dpo_kernels_match_their_twin() {
    let ctx = gpu();
    let DpoCase { ce, spans, reference, losses } = dpo_case();
    let flat: Vec<u32> = spans.iter().flatten().copied().collect();
    let (lb, sb, rb) =
        (ctx.storage_from("ce", &ce), ctx.storage_from("spans", &flat), ctx.storage_from("reference", &reference));
    let pairs = launch::DpoPairs { loss: &lb, spans: &sb, n_pairs: spans.len() };
    // The log-probabilities: sums of up to 79 values below 4 in f32, in another order than the
    // twin's f64 sum: within 79 ulps of the sum of magnitudes (< 320): 4e-3 relative is far
    // more than that; 1e-5 relative is what passes every reduction order.
    let logps = ctx.storage_zeroed("logps", 2 * spans.len());
    run(&ctx, |enc| launch::dpo_logps(&ctx, enc, pairs, &logps));
    let (_, want) = r::dpo_loss(&ce, &spans, &reference, losses[0].1, 1.0);
    let want_logps: Vec<f32> = want.iter().flat_map(|s| [s[3] as f32, s[4] as f32]).collect();
    assert_close("dpo_logps", &ctx.read_f32(&logps, 2 * spans.len()).expect("read"), &want_logps, 1e-5, 1e-5);
    for (name, how) in losses {
        let weights = ctx.storage_zeroed("weights", ce.len());
        let stats = ctx.storage_zeroed("stats", launch::DPO_STATS * spans.len());
        let k = launch::DpoLoss {
            beta: how.beta as f32,
            a: how.a as f32,
            b: how.b as f32,
            ipo: how.ipo,
            length_normalized: how.length_normalized,
        };
        run(&ctx, |enc| {
            launch::dpo_loss(
                &ctx,
                enc,
                pairs,
                k,
                launch::DpoOut { reference: &rb, weights: &weights, stats: &stats },
                0.5,
            )
        });
        let (want_w, want_s) = r::dpo_loss(&ce, &spans, &reference, how, 0.5);
        // The log-ratios are differences of sums of about 100 in f32 (a few ulps: 1e-5 of
        // 100); the loss and its derivative move by beta (or 1/n for IPO) times that.
        let want_s: Vec<f32> = want_s.iter().flatten().map(|&v| v as f32).collect();
        assert_close(
            &format!("dpo {name} stats"),
            &ctx.read_f32(&stats, want_s.len()).expect("read"),
            &want_s,
            1e-5,
            1e-5,
        );
        let want_w: Vec<f32> = want_w.iter().map(|&v| v as f32).collect();
        assert_close(
            &format!("dpo {name} weights"),
            &ctx.read_f32(&weights, ce.len()).expect("read"),
            &want_w,
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn weighted_cross_entropy_backward_kernel_matches_twin() {
    let ctx = gpu();
    let (rows, vocab) = (4, 1001);
    let logits = rand(rows * vocab, 33, 8.0);
    let targets = vec![3u32, u32::MAX, 1000, 0];
    // The kernel reads weights from row_offset on, as the model's head does chunk by chunk.
    let weights = [9.0f32, 9.0, -0.75, 2.0, 0.0, 0.5];
    let (want_loss, want_grad) = r::cross_entropy_backward_weighted(&logits, &targets, vocab, 0.5, &weights[2..]);
    let (lb, tb, out, wb) = (
        ctx.storage_from("logits", &logits),
        ctx.storage_from("targets", &targets),
        ctx.storage_zeroed("loss", rows),
        ctx.storage_from("weights", &weights),
    );
    run(&ctx, |enc| {
        launch::cross_entropy_backward_weighted(
            &ctx,
            enc,
            launch::CrossEntropy { logits: &lb, targets: &tb, loss: &out, n_rows: rows, vocab, softcap: None },
            0.5,
            &wb,
            2,
        )
    });
    assert_close("weighted loss", &ctx.read_f32(&out, rows).expect("read"), &want_loss, 1e-5, 1e-5);
    assert_close("weighted dlogits", &ctx.read_f32(&lb, rows * vocab).expect("read"), &want_grad, 1e-5, 1e-7);
}
