#!/usr/bin/env python3
"""Writes the DPO fixtures that `tests/dpo_parity.rs` and `tests/data.rs` compare against, from
Hugging Face TRL's own DPOTrainer over the tiny random Llama and Qwen2 fixtures, each with its
committed PEFT LoRA adapter (plain LoRA on Llama, rsLoRA on Qwen2):

- `dpo_tokens_expected.json`: TRL's `prompt_ids`/`chosen_ids`/`rejected_ids` for preference
  records in each of TRL's formats (explicit prompt or implicit, plain text or conversations).
- `dpo_llama_expected.safetensors`, `dpo_qwen2_expected.safetensors`: for each loss (sigmoid,
  ipo, robust with label smoothing, and conservative DPO: sigmoid with label smoothing, which
  TRL 1.16 computes as its `aot` loss on one pair at a time), one step's loss, the reward
  metrics and every LoRA gradient,
  with the policy at the committed PEFT adapter (`peft_llama_adapter`, `peft_qwen2_adapter`) and
  the reference at the base (the adapter disabled); and a
  10-step AdamW curve that starts at that adapter, where TRL's reference is a frozen copy of the
  starting adapter, with the reference computed in each step and precomputed.

    python3 -m venv ~/.cache/edgetune/refvenv
    ~/.cache/edgetune/refvenv/bin/pip install torch transformers peft trl safetensors
    ~/.cache/edgetune/refvenv/bin/python tests/reference/dpo.py [--models llama,qwen2] [--no-tokens]

Written with torch 2.x (CPU), transformers 5.24, peft 0.21.2 and trl 1.16.0.
"""
import argparse
import json
import os
import tempfile

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
# The models: base folder and PEFT adapter folder under fixtures/.
MODELS = {"llama": ("tiny_llama", "peft_llama_adapter"), "qwen2": ("tiny_qwen2", "peft_qwen2_adapter")}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# The pairs trained: conversations with an explicit prompt.
PAIRS = [
    {"prompt": [user("What is the capital of France?")], "chosen": [assistant("Paris.")],
     "rejected": [assistant("I do not know, maybe London.")]},
    {"prompt": [user("Name a quick animal.")], "chosen": [assistant("The quick brown fox")],
     "rejected": [assistant("A dog")]},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, user("Hello world")],
     "chosen": [assistant("Hello tokens!")], "rejected": [assistant("hello, hello, hello world, hello")]},
]

# One small dataset per format, for the tokenization fixture.
FORMATS = {
    "conversational": PAIRS,
    "conversational_implicit": [
        {"chosen": [user("What is the capital of France?"), assistant("Paris.")],
         "rejected": [user("What is the capital of France?"), assistant("London.")]},
        {"chosen": [user("Hi"), assistant("Hello"), user("A fox?"), assistant("The quick brown fox")],
         "rejected": [user("Hi"), assistant("Hello"), user("A fox?"), assistant("No")]},
    ],
    "standard": [
        {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " London."},
        {"prompt": "The quick brown", "chosen": " fox", "rejected": " dog jumps"},
    ],
    "standard_implicit": [
        {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is London."},
        {"chosen": "Hello world", "rejected": "Hello tokens"},
    ],
}


def tokenizer(model="llama"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(OUT, MODELS[model][0]))
    tok.pad_token = tok.eos_token
    return tok


def args(out, **kw):
    from trl import DPOConfig

    base = dict(output_dir=out, per_device_train_batch_size=len(PAIRS), max_length=None, bf16=False, fp16=False,
                use_cpu=True, report_to="none", gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, seed=0, dataloader_drop_last=False)
    base.update(kw)
    return DPOConfig(**base)


def policy(from_adapter, model="llama"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = MODELS[model]
    m = AutoModelForCausalLM.from_pretrained(os.path.join(OUT, base), dtype=torch.float32)
    if from_adapter:
        return PeftModel.from_pretrained(m, os.path.join(OUT, adapter), is_trainable=True)
    return m


def lora_config(model):
    """The committed adapter's settings (rank, alpha, rsLoRA, targets), trainable."""
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(os.path.join(OUT, MODELS[model][1]))
    cfg.inference_mode = False
    return cfg


def tokens_fixture(tmp):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    out = {}
    for name, records in FORMATS.items():
        tr = DPOTrainer(model=policy(False), args=args(tmp), train_dataset=Dataset.from_list(records),
                        processing_class=tokenizer(),
                        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        ds = tr.train_dataset
        out[name] = {
            "records": records,
            "prompt_ids": [list(r) for r in ds["prompt_ids"]],
            "chosen_ids": [list(r) for r in ds["chosen_ids"]],
            "rejected_ids": [list(r) for r in ds["rejected_ids"]],
        }
    with open(os.path.join(OUT, "dpo_tokens_expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


def key(n):
    return n.replace(".default", "").replace("base_model.model.", "base_model.model.")


def one_step(tmp, model_name, loss_type, label_smoothing):
    """The policy at the committed adapter, the reference at the base: TRL builds this when the
    adapter comes from `peft_config` (no "ref" copy; the adapter disabled is the reference), and
    the adapter's values are then set to the committed ones."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from trl import DPOTrainer

    tr = DPOTrainer(model=policy(False, model_name), args=args(tmp, loss_type=[loss_type],
                                                               label_smoothing=label_smoothing, beta=0.1),
                    train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer(model_name),
                    peft_config=lora_config(model_name))
    model = tr.model
    saved = load_file(os.path.join(OUT, MODELS[model_name][1], "adapter_model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(saved[key(n).replace(".weight", ".weight")])
    assert "ref" not in model.peft_config
    model.train()
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(len(PAIRS))])
    tr._metrics["train"].clear()
    loss = tr.compute_loss(model, inputs)
    loss.backward()
    t = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t[f"{loss_type}.grad.{key(n)}"] = p.grad.detach().numpy().copy()
    m = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    m["loss"] = float(loss)
    return t, m, inputs


def one_step_cdpo(tmp, model_name, label_smoothing):
    """Conservative DPO (the sigmoid loss with label smoothing e: -(1-e) log sigmoid(beta h) -
    e log sigmoid(-beta h), TRL 0.x's `sigmoid` with `label_smoothing`). TRL 1.16 computes exactly
    this as `aot` on a batch of one pair (sorting one log-ratio changes nothing), so each pair is
    a step of its own and the batch's loss, metrics and gradients are their means (TRL's loss is
    the mean over pairs)."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from trl import DPOTrainer

    grads, metrics, loss = {}, {}, 0.0
    saved = load_file(os.path.join(OUT, MODELS[model_name][1], "adapter_model.safetensors"))
    for pair in PAIRS:
        tr = DPOTrainer(model=policy(False, model_name),
                        args=args(tmp, loss_type=["aot"], label_smoothing=label_smoothing, beta=0.1,
                                  per_device_train_batch_size=1),
                        train_dataset=Dataset.from_list([pair]), processing_class=tokenizer(model_name),
                        peft_config=lora_config(model_name))
        model = tr.model
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(saved[key(n)])
        model.train()
        inputs = tr.data_collator([tr.train_dataset[0]])
        tr._metrics["train"].clear()
        one = tr.compute_loss(model, inputs)
        one.backward()
        loss += float(one) / len(PAIRS)
        for n, p in model.named_parameters():
            if p.requires_grad:
                k = f"cdpo.grad.{key(n)}"
                grads[k] = grads.get(k, 0) + p.grad.detach().numpy().copy() / len(PAIRS)
        for k, v in tr._metrics["train"].items():
            if k.startswith(("rewards/", "logps/")):
                metrics[k] = metrics.get(k, 0.0) + v[-1] / len(PAIRS)
    metrics["loss"] = loss
    return grads, metrics


def curve(tmp, model_name, precompute):
    """10 AdamW steps from the committed adapter; TRL's reference is a frozen copy of it."""
    from datasets import Dataset
    from trl import DPOTrainer

    torch.manual_seed(0)
    tr = DPOTrainer(model=policy(True, model_name),
                    args=args(tmp, max_steps=10, beta=0.1, precompute_ref_log_probs=precompute),
                    train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer(model_name))
    assert "ref" in tr.model.peft_config
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 10, logs
    return {k: [float(h[k]) for h in logs] for k in ("loss", "rewards/chosen", "rewards/rejected",
                                                     "rewards/margins", "rewards/accuracies", "grad_norm")}


def main():
    import peft
    import transformers
    import trl

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    ap.add_argument("--no-tokens", action="store_true", help="leave dpo_tokens_expected.json as it is")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_tokens:
            tokens_fixture(tmp)
        for model_name in a.models.split(","):
            tensors, meta = {}, {}
            for loss_type, ls in (("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)):
                t, m, inputs = one_step(tmp, model_name, loss_type, ls)
                tensors.update(t)
                meta[loss_type] = json.dumps({"label_smoothing": ls, "beta": 0.1, **m})
                print(model_name, loss_type, m)
            t, m = one_step_cdpo(tmp, model_name, 0.1)
            tensors.update(t)
            meta["cdpo"] = json.dumps({"label_smoothing": 0.1, "beta": 0.1, **m})
            print(model_name, "cdpo", m)
            tensors["input_ids"] = inputs["input_ids"].numpy()
            tensors["attention_mask"] = inputs["attention_mask"].numpy()
            tensors["completion_mask"] = inputs["completion_mask"].numpy()
            in_step = curve(tmp, model_name, False)
            pre = curve(tmp, model_name, True)
            print(model_name, "curve", in_step["loss"])
            print(model_name, "precomputed", pre["loss"])
            meta["curve"] = json.dumps(in_step)
            meta["curve_precomputed"] = json.dumps(pre)
            meta["optimizer"] = json.dumps({"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                            "max_grad_norm": 1.0, "schedule": "constant", "beta": 0.1,
                                            "loss": "sigmoid"})
            meta["versions"] = json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                           "peft": peft.__version__, "trl": trl.__version__})
            save_file(tensors, os.path.join(OUT, f"dpo_{model_name}_expected.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
