#!/usr/bin/env python3
"""The PyTorch side of scripts/bench-gpu.sh: a PEFT LoRA training step and greedy decoding on
random weights of the same shapes as `edgetune bench-train --random-weights`.

The base weights are NF4 through bitsandbytes when it imports (QLoRA, as edgetune holds them),
else bf16 (said in the output). LoRA r and alpha = 2r on all linear layers, dropout 0, AdamW,
one packed sample of `--seq` tokens per step, the loss on every token, gradient checkpointing
on or off. Prints one JSON object per measurement on stdout.

    python3 scripts/bench_torch.py --shape smollm2-135m --seq 512 --rank 16 --steps 5
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "..", "sdk", "src", "model", "shapes")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape_config(shape):
    path = shape if os.path.isfile(shape) else os.path.join(SHAPES, shape + ".json")
    with open(path) as f:
        return json.load(f)


def random_model(cfg_dict, nf4):
    """A causal LM of the shape with random weights, on the GPU: bf16, or NF4 via bitsandbytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg_dict, f)
        cfg = AutoConfig.from_pretrained(d)
        torch.manual_seed(0)
        with torch.device("cuda"):
            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            except TypeError:  # transformers before `dtype` replaced `torch_dtype`
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        if not nf4:
            return model
        from transformers import BitsAndBytesConfig

        model.save_pretrained(d)
        del model
        torch.cuda.empty_cache()
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16, device_map="cuda")


def bnb_importable():
    try:
        import bitsandbytes  # noqa: F401

        return True
    except Exception:
        return False


def train_bench(args, cfg_dict, nf4, checkpointing):
    from peft import LoraConfig, get_peft_model

    model = random_model(cfg_dict, nf4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = cfg_dict["vocab_size"]
    ids = ((torch.arange(args.seq, device="cuda") * 7919 + 13) % vocab).unsqueeze(0)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {
        "kind": "train",
        "shape": args.shape,
        "weights": "nf4 (bitsandbytes)" if nf4 else "bf16 (bitsandbytes not importable)",
        "checkpointing": checkpointing,
        "seq": args.seq,
        "rank": args.rank,
        "tokens_per_s": args.seq / min(times),
        "step_ms": {"median": statistics.median(times) * 1e3, "min": min(times) * 1e3},
        "gpu_memory_bytes": torch.cuda.max_memory_allocated(),
        "lora_parameters": sum(p.numel() for p in params),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }
    del model, opt, params
    torch.cuda.empty_cache()
    return out


def decode_bench(args, cfg_dict, nf4):
    model = random_model(cfg_dict, nf4)
    model.eval()
    vocab = cfg_dict["vocab_size"]
    ids = ((torch.arange(args.prompt_tokens, device="cuda") * 7919 + 13) % vocab).unsqueeze(0)
    gen = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, **gen)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    decode = max(total - prefill, 1e-9)
    out = {
        "kind": "decode",
        "shape": args.shape,
        "prompt_tokens": args.prompt_tokens,
        "weights": "nf4 (bitsandbytes)" if nf4 else "bf16 (bitsandbytes not importable)",
        "prefill_tokens_per_s": args.prompt_tokens / prefill,
        "decode_tokens_per_s": args.decode_tokens / decode,
    }
    del model
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=0, help="also time greedy decoding")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_torch.py: PyTorch sees no CUDA GPU")
    cfg = shape_config(args.shape)
    nf4 = bnb_importable()
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    for ckpt in modes:
        print(json.dumps(train_bench(args, cfg, nf4, ckpt)), flush=True)
    if args.decode_tokens > 0:
        print(json.dumps(decode_bench(args, cfg, nf4)), flush=True)


if __name__ == "__main__":
    main()
