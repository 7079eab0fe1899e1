#!/usr/bin/env python3
"""Writes fixtures/answer_scores_expected.json: exact match, token F1 and ROUGE-L of answer
pairs, as the tools everyone quotes compute them, for `tests/answer_scores.rs`.

- ROUGE-L: Google's `rouge-score` 0.1.2 (`RougeScorer(["rougeL"])`, its default tokenizer, no
  stemming); `score(target, prediction)`.
- Exact match and token F1: SQuAD v2.0's official evaluation functions as transformers ships
  them (`transformers.data.metrics.squad_metrics`, transformers 4.57; no torch needed).

    python3 -m venv ~/.cache/edgetune/scorevenv
    ~/.cache/edgetune/scorevenv/bin/pip install rouge-score==0.1.2 "transformers==4.57.*"
    ~/.cache/edgetune/scorevenv/bin/python tests/reference/answer_scores.py
"""
import json
import os

import rouge_score
from rouge_score import rouge_scorer
import transformers
from transformers.data.metrics.squad_metrics import compute_exact, compute_f1

HERE = os.path.dirname(os.path.abspath(__file__))

# (prediction, reference): punctuation, articles, repeated and reordered words, case, digits,
# accents (composed and combining), other scripts, final sigma, whitespace of several kinds,
# and empty or token-less answers on either side.
PAIRS = [
    ("My name is Juniper.", "My name is Juniper."),
    ("my name is juniper", "My name is Juniper!"),
    ("The cat sat on the mat.", "the cat was on a mat"),
    ("I have a grey cat called Biscuit.", "I have a grey cat called Biscuit, and a dog."),
    ("Biscuit", "I have a grey cat called Biscuit."),
    ("I live on the island of Skelmar, in the northern sea.", "Skelmar island, northern sea"),
    ("Strong black tea.", "Black coffee, strong."),
    ("tea tea tea", "tea"),
    ("the the an a", "The"),
    ("", ""),
    ("", "Paris"),
    ("Paris", ""),
    ("...", "!!!"),
    ("a an the", ""),
    ("It is 42, not 24.", "42"),
    ("state-of-the-art", "state of the art"),
    ("don't stop", "do not stop"),
    ("Café naïve résumé", "Cafe naive resume"),
    ("Cafe\u0301 na\u0131ve", "café naive"),
    ("ΣΟΦΟΣ λόγος", "σοφος λόγος"),
    ("東京に住んでいます", "東京に住んでいます"),
    ("I live in 東京 now", "I live in Tokyo now"),
    ("KELVIN \u212a and \u0130stanbul", "kelvin k and istanbul"),
    ("tabs\tand\nnewlines\u00a0and\u2003spaces", "tabs and newlines and spaces"),
    ("split\u001fby\u001eseparators", "split by separators"),
    ("under_score and a_b", "under score and a b"),
    ("€a€ the€ €an", "€ € €"),
    ("The answer is (a).", "answer is"),
    ("Fog. The lamp matters most in fog.", "Fog; the lamp matters most in fog"),
    ("one two three four five", "five four three two one"),
    ("a b c d e f g", "a c e g b d f"),
    ("I play the accordion.", "I play the violin."),
    ("emoji 🙂 only 🙂", "emoji only"),
]


def main():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    cases = []
    for prediction, reference in PAIRS:
        r = scorer.score(reference, prediction)["rougeL"]
        cases.append({
            "prediction": prediction,
            "reference": reference,
            "exact": compute_exact(reference, prediction),
            "f1": float(compute_f1(reference, prediction)),
            "rouge_l": {"precision": float(r.precision), "recall": float(r.recall), "fmeasure": float(r.fmeasure)},
        })
    out = {
        "generator": "tests/reference/answer_scores.py",
        "rouge_score": getattr(rouge_score, "__version__", "0.1.2"),
        "transformers": transformers.__version__,
        "cases": cases,
    }
    path = os.path.join(HERE, "fixtures", "answer_scores_expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(cases)} pairs")


if __name__ == "__main__":
    main()
