"""Converts a PEFT LoRA adapter folder to a GGUF LoRA adapter with gguf-py, the way llama.cpp's
convert_lora_to_gguf.py does (without torch, which that script needs): the same metadata, the
same tensor names, B of q and k permuted with the converter's LlamaModel.permute for the llama
architecture, Q8_0 falling back to F16 where rows are no whole number of blocks. Run by
tests/llama_cpp.rs with the Python of scripts/llama-cpp.sh.

    python gguf_py_adapter.py PEFT_DIR ARCH N_HEAD N_HEAD_KV N_LAYERS TYPE OUT.gguf

TYPE is f32, f16 or q8_0. Tensors are added layer by layer, q k v o gate up down, A before B.
"""
import json
import os
import struct
import sys

import gguf
import numpy as np
from gguf.quants import quantize

MODULES = [("self_attn", "q_proj", "attn_q"), ("self_attn", "k_proj", "attn_k"), ("self_attn", "v_proj", "attn_v"),
           ("self_attn", "o_proj", "attn_output"), ("mlp", "gate_proj", "ffn_gate"), ("mlp", "up_proj", "ffn_up"),
           ("mlp", "down_proj", "ffn_down")]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": None}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        if t["dtype"] == "BF16":
            raw = np.frombuffer(data[b:e], dtype=np.uint16).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[b:e], dtype=dtypes[t["dtype"]]).astype(np.float32)
        out[name] = arr.reshape(t["shape"])
    return out


def permute(weights, n_head, n_head_kv):
    # convert_hf_to_gguf.py, LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def main():
    peft_dir, arch, n_head, n_head_kv, n_layers, ty, out = sys.argv[1:]
    n_head, n_head_kv, n_layers = int(n_head), int(n_head_kv), int(n_layers)
    cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    tensors = read_safetensors(os.path.join(peft_dir, "adapter_model.safetensors"))
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= float(cfg["r"]) ** 0.5

    w = gguf.GGUFWriter(out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[ty]
    for layer in range(n_layers):
        for parent, hf, name in MODULES:
            for ab in ("A", "B"):
                key = f"base_model.model.model.layers.{layer}.{parent}.{hf}.lora_{ab}.weight"
                if key not in tensors:
                    continue
                x = tensors[key]
                if ab == "B" and arch == "llama" and hf == "q_proj":
                    x = permute(x, n_head, n_head)
                elif ab == "B" and arch == "llama" and hf == "k_proj":
                    x = permute(x, n_head, n_head_kv)
                x = np.ascontiguousarray(x, dtype=np.float32)
                t = qtype
                try:
                    data = quantize(x, t)
                except gguf.QuantError:
                    t = gguf.GGMLQuantizationType.F16
                    data = quantize(x, t)
                w.add_tensor(f"blk.{layer}.{name}.weight.lora_{ab.lower()}", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
