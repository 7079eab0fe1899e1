//! NF4 against bitsandbytes and ggml block dequantization against gguf-py, from fixtures that
//! tests/reference/generate.py wrote with those libraries.

mod common;

use common::Fixture;
use edgetune::quant::gguf_blocks::{self, GgmlType};
use edgetune::quant::nf4;

const CASES: [&str; 5] = ["w64x128", "w48x192_outliers", "w5x100_remainder", "w8x64_zero_block", "w320x64_double"];

#[test]
fn nf4_codes_and_absmax_are_bit_identical_to_bitsandbytes() {
    let fx = Fixture::open("nf4_bnb.safetensors");
    for case in CASES {
        let input = fx.f32(&format!("{case}.input"));
        let shape = fx.shape(&format!("{case}.input"));
        let q = nf4::quantize(&input, &shape, 64).expect("valid input");
        let want_packed = fx.u8(&format!("{case}.packed"));
        let want_absmax = fx.f32(&format!("{case}.absmax"));
        if let Some(i) = q.packed.iter().zip(&want_packed).position(|(a, b)| a != b) {
            panic!("{case}: packed byte {i} is {:#04x}, bitsandbytes wrote {:#04x}", q.packed[i], want_packed[i]);
        }
        assert_eq!(q.packed.len(), want_packed.len(), "{case}: packed length");
        assert_eq!(
            q.absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want_absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{case}: absmax"
        );
        let deq = q.dequantize();
        let want = fx.f32(&format!("{case}.dequant"));
        assert_eq!(
            deq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{case}: dequantized values"
        );
    }
}

#[test]
fn nf4_double_quantization_matches_bitsandbytes() {
    let fx = Fixture::open("nf4_bnb.safetensors");
    let code = nf4::dynamic_map_signed();
    let want_code = fx.f32("w64x128.dq_code");
    for (i, (a, b)) in code.iter().zip(&want_code).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "dynamic map entry {i}: {a} vs {b}");
    }
    for case in CASES {
        let absmax = fx.f32(&format!("{case}.absmax"));
        let want_offset = fx.f32(&format!("{case}.dq_offset"))[0];
        // The offset is a mean; torch sums f32 in its own order, so allow one ulp.
        let ours = nf4::double_quantize(&absmax, 256).offset;
        assert!(ours.to_bits().abs_diff(want_offset.to_bits()) <= 1, "{case}: offset {ours} vs {want_offset}");
        let dq = nf4::double_quantize_with_offset(&absmax, want_offset, 256);
        assert_eq!(dq.absmax2, fx.f32(&format!("{case}.dq_absmax2")), "{case}: absmax2");
        // bitsandbytes' CPU kernel finds the 8-bit code with an approximate table search
        // (BinSearch "Direct2") that, rarely, lands one code away from the nearest; its CUDA
        // kernel picks the nearest, as edgetune does. So: equal everywhere, except where our code
        // is strictly nearer than the one bitsandbytes wrote.
        let want_codes = fx.u8(&format!("{case}.dq_absmax_q"));
        let mut differ = 0;
        for (i, (&ours, &theirs)) in dq.codes.iter().zip(&want_codes).enumerate() {
            if ours != theirs {
                let x = (absmax[i] - dq.offset) / dq.absmax2[i / 256];
                let (d_ours, d_theirs) = ((x - code[ours as usize]).abs(), (x - code[theirs as usize]).abs());
                assert!(
                    d_ours < d_theirs,
                    "{case}: absmax code {i}: ours {ours} (dist {d_ours}) vs bnb {theirs} (dist {d_theirs})"
                );
                differ += 1;
            }
        }
        assert!(differ * 50 <= want_codes.len().max(50), "{case}: {differ} of {} codes differ", want_codes.len());
        // Dequantization formula, on bitsandbytes' own codes: bit-exact.
        let theirs = nf4::DoubleQuant { codes: want_codes, ..dq };
        let q =
            nf4::quantize(&fx.f32(&format!("{case}.input")), &fx.shape(&format!("{case}.input")), 64).expect("valid");
        let q2 = nf4::Nf4Tensor { absmax: theirs.dequantize(), ..q };
        let want = fx.f32(&format!("{case}.dq_dequant"));
        common::assert_close(&format!("{case} double-quant dequant"), &q2.dequantize(), &want, 0.0, 0.0);
    }
}

#[test]
fn ggml_blocks_dequantize_like_gguf_py() {
    let fx = Fixture::open("gguf_blocks.safetensors");
    for (name, ty) in [
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q4_K", GgmlType::Q4K),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q5_K", GgmlType::Q5K),
        ("Q6_K", GgmlType::Q6K),
    ] {
        let bytes = fx.u8(&format!("{name}.bytes"));
        let want = fx.f32(&format!("{name}.dequant"));
        let got = gguf_blocks::dequantize(ty, &bytes, want.len()).expect("valid blocks");
        common::assert_close(name, &got, &want, 0.0, 0.0);
    }
}
