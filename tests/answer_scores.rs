//! Exact match, token F1 and ROUGE-L against the packages everyone quotes them from: SQuAD
//! v2.0's evaluation functions (as transformers ships them) and Google's `rouge-score`, on the
//! pairs `tests/reference/answer_scores.py` scored with them.

mod common;

use edgetune::score::{self, AnswerScores};

/// Both sides compute each score with the same IEEE f64 operations in the same order, so they
/// agree to the bit; the fixture's decimals come back through serde_json's parser, which
/// (without its `float_roundtrip` feature) may round the last place the other way. Scores lie
/// in [0, 1], so two units in the last place of 1.0 bound that.
const TOL: f64 = 2.0 * f64::EPSILON;

fn number(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("fixture: {what} is not a number: {v}"))
}

#[test]
fn scores_match_squad_and_rouge_score_on_every_fixture_pair() {
    let path = common::fixtures().join("answer_scores_expected.json");
    let text = std::fs::read_to_string(&path).expect("fixture");
    let fx: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30, "the fixture has its pairs");
    let mut all = Vec::new();
    let mut failures = Vec::new();
    for c in cases {
        let (pred, reference) =
            (c["prediction"].as_str().expect("prediction"), c["reference"].as_str().expect("reference"));
        let got = AnswerScores::of(pred, reference);
        let rouge = score::rouge_l(pred, reference);
        let want = [
            ("exact", got.exact, number(&c["exact"], "exact")),
            ("f1", got.f1, number(&c["f1"], "f1")),
            ("rouge_l.precision", rouge.precision, number(&c["rouge_l"]["precision"], "precision")),
            ("rouge_l.recall", rouge.recall, number(&c["rouge_l"]["recall"], "recall")),
            ("rouge_l.fmeasure", got.rouge_l, number(&c["rouge_l"]["fmeasure"], "fmeasure")),
        ];
        for (name, g, w) in want {
            if (g - w).abs() > TOL {
                failures.push(format!("{pred:?} against {reference:?}: {name} {g}, the peer says {w}"));
            }
        }
        all.push(got);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The means are the plain averages of what was checked above.
    let mean = AnswerScores::mean(&all);
    let n = all.len() as f64;
    assert!((mean.f1 - all.iter().map(|s| s.f1).sum::<f64>() / n).abs() < 1e-12);
    assert!((0.0..=1.0).contains(&mean.exact) && (0.0..=1.0).contains(&mean.rouge_l));
    assert_eq!(AnswerScores::mean(&[]), AnswerScores::default());
}
