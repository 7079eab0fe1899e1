#!/usr/bin/env python3
"""Turns the exported rows (data/*.jsonl) into the tokenized dataset LLaMA-Factory loads from
`tokenized_path` (tokenized/, written with `datasets.save_to_disk`).

Written by `edgetune export-job --to llamafactory`; run.sh runs it before `llamafactory-cli train`.
Each row is one of edgetune's packed micro-batches. Its `attention_mask` numbers the packed
samples 1, 2, 3, ... (LLaMA-Factory's neat packing), so that the collator builds a
block-diagonal causal mask and no sample attends to another; `labels` are -100 where nothing is
trained.
"""
import json
import os

from datasets import Dataset, DatasetDict

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(path):
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out["input_ids"].append(r["input_ids"])
            out["attention_mask"].append([k + 1 for k, n in enumerate(r["seq_lengths"]) for _ in range(n)])
            out["labels"].append(r["labels"])
    return Dataset.from_dict(out)


def main():
    with open(os.path.join(HERE, "job.json")) as f:
        job = json.load(f)
    splits = {"train": rows(os.path.join(HERE, job["data"]["train"]))}
    if job["data"]["validation"]:
        splits["validation"] = rows(os.path.join(HERE, job["data"]["validation"]))
    DatasetDict(splits).save_to_disk(os.path.join(HERE, "tokenized"))
    print(f"tokenized/: {len(splits['train'])} training rows")


if __name__ == "__main__":
    main()
