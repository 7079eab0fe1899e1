"""Checks edgetune's quantized GGUF tensors against gguf-py's quantizers (bit-exact with ggml's
reference ones): every matrix of F32.gguf quantized by gguf-py to TYPE must have the bytes that
OURS.gguf holds for it (matrices whose rows are no whole number of blocks are left out, as
edgetune writes those as F16). Run by tests/llama_cpp.rs with the Python of scripts/llama-cpp.sh.

    python gguf_py_quantize.py F32.gguf OURS.gguf TYPE     (TYPE: Q8_0 or Q4_0)

Prints {"compared": N, "mismatched": [names]} on stdout.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize


def main():
    f32_path, ours_path, ty = sys.argv[1:]
    qtype = GGMLQuantizationType[ty]
    block = {"Q8_0": 32, "Q4_0": 32}[ty]
    source = {t.name: t for t in GGUFReader(f32_path).tensors}
    ours = {t.name: t for t in GGUFReader(ours_path).tensors}
    compared, mismatched = 0, []
    for name, t in source.items():
        shape = [int(d) for d in reversed(t.shape)]
        if len(shape) < 2 or shape[-1] % block:
            continue
        want = quantize(np.asarray(t.data, dtype=np.float32).reshape(shape), qtype).tobytes()
        got = ours[name]
        compared += 1
        if got.tensor_type != qtype or np.asarray(got.data).tobytes() != want:
            mismatched.append(name)
    print(json.dumps({"compared": compared, "mismatched": mismatched}))


if __name__ == "__main__":
    main()
