"""Logits and a greedy continuation from llama.cpp itself (through llama-cpp-python), the judge
of edgetune's GGUF adapters and merged GGUF files. Run by tests/llama_cpp.rs with the Python of
scripts/llama-cpp.sh.

Reads one JSON request on stdin:
    {"model": "base.gguf", "lora": "adapter.gguf" or null, "ids": [token ids],
     "greedy": number of tokens to continue greedily, "out": "logits.f32"}
and writes the logits of every position of `ids` to `out` (little-endian f32, row-major
(len(ids), n_vocab)), then prints {"n_vocab": V, "greedy": [ids], "margins": [top-1 minus top-2 logit at each greedy
step]} on stdout. With "text" in the request, the answer also holds "tokens": llama.cpp's own
tokenization of the text (BOS added where the file says so, special and user-defined tokens
matched whole).

The KV cache is kept in f32 (llama.cpp's default is f16) so that an f32 base is computed in f32
throughout, as edgetune computes it.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0


def main():
    req = json.load(sys.stdin)
    ids = [int(i) for i in req["ids"]]
    n_ctx = len(ids) + int(req.get("greedy", 0)) + 8
    llm = Llama(
        model_path=req["model"],
        lora_path=req.get("lora"),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=2,
        n_gpu_layers=0,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    logits.tofile(req["out"])
    greedy, margins = [], []
    for _ in range(int(req.get("greedy", 0))):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.sort(row)[-2:]
        tok = int(np.argmax(row))
        greedy.append(tok)
        margins.append(float(top2[1] - top2[0]))
        llm.eval([tok])
    answer = {"n_vocab": int(llm.n_vocab()), "greedy": greedy, "margins": margins}
    if req.get("text") is not None:
        answer["tokens"] = [int(t) for t in llm.tokenize(req["text"].encode(), add_bos=True, special=True)]
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
