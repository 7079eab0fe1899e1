"""Quantizes F32.gguf with llama.cpp's own quantizer (llama_model_quantize, the code behind
llama-quantize) to OUT.gguf with llama.cpp file type FTYPE, then (given OURS.gguf) compares every tensor that
llama.cpp wrote as Q4_K with the same tensor of OURS.gguf, byte for byte. Run by
tests/llama_cpp.rs with the Python of scripts/llama-cpp.sh.

    python llama_cpp_quantize.py F32.gguf OUT.gguf FTYPE [OURS.gguf]

Prints {"compared": N, "mismatched": [names], "types": {llama.cpp's type: count}} on stdout.
"""
import ctypes
import json
import sys

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader


def main():
    src, out, ftype, *ours_path = sys.argv[1:]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")
    theirs = GGUFReader(out).tensors
    ours = {t.name: t for path in ours_path for t in GGUFReader(path).tensors}
    compared, mismatched, types = 0, [], {}
    for t in theirs:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.tensor_type != GGMLQuantizationType.Q4_K or not ours_path:
            continue
        compared += 1
        mine = ours[t.name]
        if mine.tensor_type != t.tensor_type or np.asarray(mine.data).tobytes() != np.asarray(t.data).tobytes():
            mismatched.append(t.name)
    print(json.dumps({"compared": compared, "mismatched": mismatched, "types": types}))


if __name__ == "__main__":
    main()
