//! Scores of a generated answer against a reference answer, as the usual tools compute them:
//! exact match and token F1 as SQuAD's official evaluation script (v2.0) does, and ROUGE-L as
//! Google's `rouge-score` package does with its default tokenizer (no stemming).
//!
//! Both are reproduced to the character, because a score that differs from the one everyone
//! quotes is worse than none: `tests/answer_scores.rs` holds them to the Python packages' own
//! results (`tests/reference/answer_scores.py`) on strings with punctuation, articles, repeated
//! words, accents, other scripts and empty answers.
//!
//! - **SQuAD normalization**: Unicode lowercase (as Python's `str.lower`), ASCII punctuation
//!   removed, the words "a", "an" and "the" removed where they stand alone between word
//!   boundaries, whitespace collapsed. Exact match compares the normalized strings; F1 counts
//!   the words the two share (as multisets). An empty answer scores 1 against an empty
//!   reference and 0 against any other.
//! - **ROUGE-L**: lowercase, then the tokens are the runs of ASCII letters and digits (so words
//!   in other scripts are not tokens, as in `rouge-score`); precision and recall are the longest
//!   common subsequence over the prediction's and the reference's token counts, and the score is
//!   their harmonic mean (0 when either text has no tokens).
//!
//! One known difference: Python's regular expressions count a letter's combining marks that
//! Unicode calls alphabetic (the vowel signs of Indic scripts, circled letters) as non-word
//! characters, Rust as word characters; it changes a score only where such a mark touches a
//! stand-alone "a", "an" or "the".

/// The scores of one answer against its reference.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct AnswerScores {
    /// 1 when the normalized answer equals the normalized reference, else 0.
    pub exact: f64,
    /// SQuAD's token F1.
    pub f1: f64,
    /// ROUGE-L's F-measure.
    pub rouge_l: f64,
}

impl AnswerScores {
    /// Scores `prediction` against `reference`.
    pub fn of(prediction: &str, reference: &str) -> Self {
        AnswerScores {
            exact: f64::from(u8::from(exact_match(prediction, reference))),
            f1: token_f1(prediction, reference),
            rouge_l: rouge_l(prediction, reference).fmeasure,
        }
    }

    /// The mean of each score over `all` (zeros when `all` is empty).
    pub fn mean(all: &[AnswerScores]) -> Self {
        if all.is_empty() {
            return AnswerScores::default();
        }
        let n = all.len() as f64;
        AnswerScores {
            exact: all.iter().map(|s| s.exact).sum::<f64>() / n,
            f1: all.iter().map(|s| s.f1).sum::<f64>() / n,
            rouge_l: all.iter().map(|s| s.rouge_l).sum::<f64>() / n,
        }
    }
}

/// ROUGE-L's precision, recall and F-measure.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rouge {
    /// LCS length over the prediction's tokens.
    pub precision: f64,
    /// LCS length over the reference's tokens.
    pub recall: f64,
    /// 2 · precision · recall / (precision + recall).
    pub fmeasure: f64,
}

/// Python's `str.isspace`: Unicode's White_Space characters and the four ASCII separators
/// U+001C to U+001F, which Python also splits on.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A word character of Python's `re` in Unicode mode (see the module's note on marks).
fn word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// SQuAD's `normalize_answer`: the normalized words.
fn squad_words(s: &str) -> Vec<String> {
    let no_punct: Vec<char> = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // `\b(a|an|the)\b` replaced by a space: a run of word characters that is one of the articles.
    let mut text = String::with_capacity(no_punct.len());
    let mut i = 0;
    while i < no_punct.len() {
        if word_char(no_punct[i]) {
            let start = i;
            while i < no_punct.len() && word_char(no_punct[i]) {
                i += 1;
            }
            let run: String = no_punct[start..i].iter().collect();
            if matches!(run.as_str(), "a" | "an" | "the") {
                text.push(' ');
            } else {
                text.push_str(&run);
            }
        } else {
            text.push(no_punct[i]);
            i += 1;
        }
    }
    text.split(python_space).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// SQuAD's exact match: the normalized strings are equal.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    squad_words(prediction) == squad_words(reference)
}

/// SQuAD's token F1 over the normalized words.
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let pred = squad_words(prediction);
    let gold = squad_words(reference);
    if pred.is_empty() || gold.is_empty() {
        return f64::from(u8::from(pred == gold));
    }
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in &gold {
        *left.entry(w.as_str()).or_default() += 1;
    }
    let mut same = 0usize;
    for w in &pred {
        if let Some(n) = left.get_mut(w.as_str())
            && *n > 0
        {
            *n -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// `rouge-score`'s default tokens: the runs of `[a-z0-9]` in the lowercased text.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// ROUGE-L of `prediction` against `reference`.
pub fn rouge_l(prediction: &str, reference: &str) -> Rouge {
    let pred = rouge_tokens(prediction);
    let gold = rouge_tokens(reference);
    if pred.is_empty() || gold.is_empty() {
        return Rouge::default();
    }
    // The longest common subsequence, one row of the table at a time.
    let mut prev = vec![0usize; pred.len() + 1];
    let mut row = vec![0usize; pred.len() + 1];
    for g in &gold {
        for (j, p) in pred.iter().enumerate() {
            row[j + 1] = if g == p { prev[j] + 1 } else { prev[j + 1].max(row[j]) };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    let lcs = prev[pred.len()] as f64;
    let precision = lcs / pred.len() as f64;
    let recall = lcs / gold.len() as f64;
    let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    Rouge { precision, recall, fmeasure }
}
