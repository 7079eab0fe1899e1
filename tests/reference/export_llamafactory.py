#!/usr/bin/env python3
"""Fixtures for `edgetune export-job --to llamafactory`: the exported job run by LLaMA-Factory.

It exports tiny Llama's persona job (the arguments of the Llama case of export_job.py), runs the
exported prepare_data.py, then, with LLaMA-Factory 0.9.5 itself:
  - its argument parser reads the exported job.yaml;
  - its data loader (`get_dataset`, from `tokenized_path`) and its SFT collator (neat packing:
    a block-diagonal causal mask) give, for each row, the exported ids and labels and a mask
    that lets each token see exactly the earlier tokens of its own sample;
  - `run_exp` trains the ten steps (f32 on the CPU) and its log gives each step's loss,
    gradient norm and learning rate.
`tests/export_job.rs` holds edgetune to it.

    python3 -m venv ~/.cache/edgetune/lf-venv
    ~/.cache/edgetune/lf-venv/bin/pip install llamafactory==0.9.5
    ~/.cache/edgetune/lf-venv/bin/python tests/reference/export_llamafactory.py [--edgetune PATH_TO_THE_CLI]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import yaml
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIX = os.path.join(HERE, "fixtures")
PERSONA = os.path.join(ROOT, "sdk", "data", "persona", "train.jsonl")
ARGS = ["--to", "llamafactory", "--quant", "none", "--max-steps", "10", "--seed", "3", "--warmup-steps", "2",
        "--grad-accum", "2"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edgetune", default=os.path.expanduser("~/.cache/edgetune/target/debug/edgetune"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="export-lf-")
    job_dir = os.path.join(work, "job")
    subprocess.run([a.edgetune, "export-job", "--model", os.path.join(FIX, "tiny_llama"), "--data", PERSONA,
                    "--output", job_dir, *ARGS], check=True)
    subprocess.run([sys.executable, os.path.join(job_dir, "prepare_data.py")], check=True)
    os.chdir(job_dir)
    with open("job.yaml") as f:
        settings = yaml.safe_load(f)

    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(settings))
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    data = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, training_args.do_train)
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template,
        model=model,
        label_pad_token_id=-100,
        block_diag_attn=model_args.block_diag_attn,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype,
        neat_packing=data_args.neat_packing,
        **tokenizer_module,
    )
    with open(os.path.join("data", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = data["train_dataset"]
    assert len(train) == len(rows), (len(train), len(rows))
    tensors = {}
    for i, row in enumerate(rows):
        b = collator([train[i]])
        ids = b["input_ids"][0].tolist()
        assert ids == row["input_ids"], f"row {i}: LLaMA-Factory's ids differ from the exported row"
        assert b["labels"][0].tolist() == row["labels"], f"row {i}: labels differ"
        mask = b["attention_mask"][0, 0]  # (q, k): 0 where attending, the dtype's minimum elsewhere
        allowed = mask == 0
        seq = torch.tensor([k for k, n in enumerate(row["seq_lengths"]) for _ in range(n)])
        q = torch.arange(len(ids))
        want = (seq[:, None] == seq[None, :]) & (q[None, :] <= q[:, None])
        assert torch.equal(allowed, want), f"row {i}: the mask is not block-diagonal causal over the samples"
        tensors[f"row{i}.input_ids"] = b["input_ids"][0].to(torch.int64)
        tensors[f"row{i}.labels"] = b["labels"][0].to(torch.int64)
        tensors[f"row{i}.sample_of_token"] = seq.to(torch.int64)
    print(f"{len(rows)} rows: LLaMA-Factory's loader and collator give the exported ids, labels and a "
          "block-diagonal causal mask")

    from llamafactory.train.tuner import run_exp

    run_exp(dict(settings))
    with open(os.path.join("output", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    steps = [h for h in history if "loss" in h and "step" in h and "train_loss" not in h]
    assert len(steps) == settings["max_steps"], steps
    tensors["losses"] = torch.tensor([h["loss"] for h in steps], dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor([h["grad_norm"] for h in steps], dtype=torch.float32)
    tensors["learning_rates"] = torch.tensor([h["learning_rate"] for h in steps], dtype=torch.float32)
    import llamafactory
    import transformers

    meta = {
        "args": json.dumps(ARGS),
        "job_yaml": open("job.yaml").read(),
        "prepare_data_py": open("prepare_data.py").read(),
        "versions": json.dumps({"llamafactory": llamafactory.__version__, "transformers": transformers.__version__}),
    }
    out = os.path.join(FIX, "export_llamafactory_llama_expected.safetensors")
    save_file(tensors, out, metadata=meta)
    print(f"losses {[round(h['loss'], 4) for h in steps]}")
    print(f"wrote {out}")
    os.chdir(ROOT)
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
