#!/usr/bin/env python3
"""Fixtures for `edgetune export-job --to trl`: the exported job run by TRL itself.

For tiny Llama (a Hugging Face folder) and tiny Qwen2 (a GGUF file, which the export converts),
with the persona data, it exports a 10-step job with the edgetune CLI, then, with the exported
`train.py` (TRL 1.16's SFTTrainer, PEFT, f32 on the CPU):
  - takes the batches TRL's data loader and collator hand the model (input_ids, labels,
    position_ids) for each step, and checks every sample's ids against transformers'
    `apply_chat_template` of its record, and its trained tokens against the assistant turns;
  - trains the 10 steps and records each step's loss and gradient norm;
  - keeps the adapter TRL wrote and PEFT's logits with it on a probe sequence.
The Qwen2 job, exported for 2 GPUs, also runs on 2 processes (accelerate, gloo on the CPU) and
takes the same steps. Then it runs the default job (a 4-bit NF4 base through bitsandbytes) for three steps, to check
that its 4-bit path loads and trains: NF4 in blocks of 64, the LoRA weights in f32.
`tests/export_job.rs` exports the same jobs in CI and holds edgetune to all of it.

    ~/.cache/edgetune/refvenv/bin/pip install torch transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets accelerate safetensors
    ~/.cache/edgetune/refvenv/bin/python tests/reference/export_job.py [--edgetune PATH_TO_THE_CLI]
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIX = os.path.join(HERE, "fixtures")
PERSONA = os.path.join(ROOT, "sdk", "data", "persona", "train.jsonl")

# name, model, the export's extra arguments (shared with tests/export_job.rs)
CASES = [
    ("llama", os.path.join(FIX, "tiny_llama"), ["--grad-accum", "2"]),
    ("qwen2", os.path.join(FIX, "tiny_qwen2_bpe.gguf"), ["--gpus", "2", "--rank", "8", "--rslora"]),
]
COMMON = ["--to", "trl", "--quant", "none", "--max-steps", "10", "--seed", "3", "--warmup-steps", "2"]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def messages_of(record):
    """A record's conversation: its messages, or an Alpaca record's instruction (and input) and
    output as one exchange."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def chat_ids(tok, messages):
    """Token ids of a conversation with the model's chat template, and which are trained (the
    assistant turns' tokens), as prefixes of the rendered template give them."""
    ids, train = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        upto = tok(tok.apply_chat_template(messages[: i + 1], tokenize=False), add_special_tokens=False)["input_ids"]
        assert upto[: len(ids)] == ids and upto[: len(before)] == before, "template prefixes differ"
        train += [False] * (len(before) - len(ids)) + [True] * (len(upto) - len(before))
        ids = upto
    return ids, train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edgetune", default=os.path.expanduser("~/.cache/edgetune/target/debug/edgetune"))
    a = ap.parse_args()
    torch.manual_seed(0)
    data = records(PERSONA)
    for name, model, extra in CASES:
        work = tempfile.mkdtemp(prefix=f"export-{name}-")
        job_dir = os.path.join(work, "job")
        subprocess.run([a.edgetune, "export-job", "--model", model, "--data", PERSONA, "--output", job_dir,
                        *COMMON, *extra], check=True)
        spec = importlib.util.spec_from_file_location("exported_train", os.path.join(job_dir, "train.py"))
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        job = train.load_job(job_dir)
        trainer = train.build_trainer(job, folder=job_dir, output=os.path.join(work, "out"), f32=True)

        # What TRL hands the model, step by step (one process: the step's rows by accumulation).
        tok = trainer.processing_class
        rows = records(os.path.join(job_dir, "data", "train.jsonl"))
        batches = list(trainer.get_train_dataloader())
        assert len(batches) == len(rows), (len(batches), len(rows))
        ids, labels, positions = [], [], []
        checked = 0
        for row, b in zip(rows, batches):
            got = b["input_ids"][0].tolist()
            assert got == row["input_ids"], f"{name}: TRL's batch differs from the exported row"
            ids.append(torch.tensor(got, dtype=torch.int64))
            labels.append(b["labels"][0].to(torch.int64))
            positions.append(b["position_ids"][0].to(torch.int64))
            start = 0
            for n, source in zip(row["seq_lengths"], row["sources"]):
                lines = [int(x) for x in source.rsplit(":", 1)[1].split(",")]
                want, trained = chat_ids(tok, [m for line in lines for m in messages_of(data[line - 1])])
                assert got[start:start + n] == want, f"{name}: {source} is not the chat template's tokens"
                lab = b["labels"][0, start:start + n].tolist()
                assert [x != -100 for x in lab[1:]] == trained[1:], f"{name}: {source}: trained tokens differ"
                assert b["position_ids"][0, start:start + n].tolist() == list(range(n))
                start += n
                checked += 1
        print(f"{name}: {len(rows)} rows, {checked} samples equal to apply_chat_template, masks to the assistant turns")

        trainer.train()
        steps = [h for h in trainer.state.log_history if "loss" in h]
        assert len(steps) == job["training"]["max_steps"], steps
        adapter_dir = os.path.join(FIX, f"export_trl_{name}_adapter")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        trainer.save_model(adapter_dir)
        for f in os.listdir(adapter_dir):  # the adapter alone (save_model adds the tokenizer and a README)
            if f not in ("adapter_config.json", "adapter_model.safetensors"):
                os.remove(os.path.join(adapter_dir, f))
        model = trainer.model.eval()
        probe = torch.tensor([rows[0]["input_ids"][: rows[0]["seq_lengths"][0]]])
        with torch.no_grad():
            logits = model(input_ids=probe).logits[0].float()
        tensors = {
            "losses": torch.tensor([h["loss"] for h in steps], dtype=torch.float32),
            "grad_norms": torch.tensor([h["grad_norm"] for h in steps], dtype=torch.float32),
            "learning_rates": torch.tensor([h["learning_rate"] for h in steps], dtype=torch.float32),
            "probe_ids": probe[0],
            "probe_logits": logits.contiguous(),
        }
        for i, (x, l, p) in enumerate(zip(ids, labels, positions)):
            tensors[f"row{i}.input_ids"] = x
            tensors[f"row{i}.labels"] = l
            tensors[f"row{i}.position_ids"] = p
        meta = {
            "args": json.dumps(COMMON + extra),
            "train_jsonl_sha256": sha256(os.path.join(job_dir, "data", "train.jsonl")),
            "init_adapter_sha256": sha256(os.path.join(job_dir, "init_adapter", "adapter_model.safetensors")),
            "job": json.dumps(job, sort_keys=True),
            "train_py": open(os.path.join(job_dir, "train.py")).read(),
            "versions": json.dumps({m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "trl")}),
        }
        out = os.path.join(FIX, f"export_trl_{name}_expected.safetensors")
        save_file(tensors, out, metadata=meta)
        print(f"{name}: losses {[round(h['loss'], 4) for h in steps]}")
        if job["gpus"] > 1:
            # The job as exported for several GPUs, on as many processes (accelerate, gloo on the
            # CPU): each takes its rows of every step, and the steps are the one-process steps.
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes",
                      str(job["gpus"]), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            ddp_out = os.path.join(work, "ddp")
            subprocess.run([*launch, "train.py", "--f32", "--output", ddp_out], cwd=job_dir, check=True)
            with open(os.path.join(ddp_out, "losses.json")) as f:
                ddp = json.load(f)["steps"]
            for h, d in zip(steps, ddp, strict=True):
                assert abs(h["loss"] - d["loss"]) <= 1e-5 * abs(h["loss"]), (h, d)
            save_file(
                {k: torch.tensor([d[f] for d in ddp], dtype=torch.float32)
                 for k, f in (("losses", "loss"), ("grad_norms", "grad_norm"), ("learning_rates", "learning_rate"))},
                os.path.join(FIX, f"export_trl_{name}_ddp_expected.safetensors"),
                metadata={"args": json.dumps(COMMON + extra), "processes": str(job["gpus"])},
            )
            print(f"{name}: {job['gpus']} processes: losses {[round(d['loss'], 4) for d in ddp]}")
        print(f"wrote {out} and {adapter_dir}")
        shutil.rmtree(work)
    # The default job: a 4-bit NF4 base through bitsandbytes (on the CPU its products run in f32).
    work = tempfile.mkdtemp(prefix="export-nf4-")
    job_dir = os.path.join(work, "job")
    args = [a for a in COMMON if a not in ("--quant", "none")]
    args[args.index("--max-steps") + 1] = "3"
    subprocess.run([a.edgetune, "export-job", "--model", CASES[0][1], "--data", PERSONA, "--output", job_dir,
                    *args, *CASES[0][2]], check=True)
    spec = importlib.util.spec_from_file_location("exported_train_nf4", os.path.join(job_dir, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    job = train.load_job(job_dir)
    assert job["base"]["nf4"] and not job["base"]["double_quant"]
    trainer = train.build_trainer(job, folder=job_dir, output=os.path.join(work, "out"))
    q = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert q and all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.blocksize == 64 for m in q)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad), "LoRA kept in f32"
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in steps]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    print(f"nf4 job: {len(q)} Linear4bit (nf4, blocks of 64), LoRA in f32, 3 steps: losses {losses}")
    save_file(
        {k: torch.tensor([h[f] for h in steps], dtype=torch.float32)
         for k, f in (("losses", "loss"), ("grad_norms", "grad_norm"), ("learning_rates", "learning_rate"))},
        os.path.join(FIX, "export_trl_llama_nf4_expected.safetensors"),
        metadata={"args": json.dumps([*args, *CASES[0][2]]), "train_py": open(os.path.join(job_dir, "train.py")).read(),
                  "bitsandbytes": __import__("bitsandbytes").__version__},
    )
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
