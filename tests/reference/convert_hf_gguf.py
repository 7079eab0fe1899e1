#!/usr/bin/env python3
"""Writes tests/reference/fixtures/hf_gguf_expected.json: what llama.cpp's own
convert_hf_to_gguf.py writes for the tiny Hugging Face fixtures, the file that edgetune's GGUF
written from a folder (`edgetune merge --format gguf` of a folder, `lora::merge::convert_gguf`)
must match in tests/llama_cpp.rs: every metadata key with its GGUF type and value, and every
tensor's name, shape, type and an FNV-1a 64 hash of its bytes (F32, so the bytes are the
values), and each tensor's type and hash with `--outtype q8_0`; and the ids Hugging Face
tokenizers encodes a text to with each folder's tokenizer.json.

The converter is the one in the source distribution of llama-cpp-python 0.3.36 (the version
scripts/llama-cpp.sh builds), run with torch and transformers:

    python3 -m venv ~/.cache/edgetune/refvenv
    ~/.cache/edgetune/refvenv/bin/pip install torch transformers safetensors sentencepiece protobuf numpy pyyaml
    ~/.cache/edgetune/refvenv/bin/python tests/reference/convert_hf_gguf.py

Written with torch 2.15, transformers 5.25, tokenizers 0.23.3, sentencepiece 0.2.3 and that
converter. One input is handed to the
converter: the pre-tokenizer's name. The converter names it by hashing the token ids of a
test string against a table of published tokenizers, and the tiny tokenizer is none of them;
each case says which pre-tokenizer its tokenizer.json declares (tests/gguf_models.rs checks
that edgetune names each one so that it tokenizes as the folder does).

Each case is a fixture folder with some files replaced (`edits`, stored in the JSON so that the
test builds the same folder): `tiny_llama_llama3` gives tiny Llama Llama 3's RoPE scaling and
pre-tokenizer, a TemplateProcessing post-processor that adds BOS, BOS and padding tokens in
tokenizer_config.json, an added token that is not special and two ids the tokenizer lacks.
A case may also copy the files of another fixture folder over its base (`files`):
`tiny_llama_sentencepiece` gives tiny Llama a SentencePiece tokenizer (tokenizer.model, and the
tokenizer.json transformers converts it to; `spm_tokenizer_files`), which the converter writes
as a `llama` vocabulary with scores. The Gemma cases set query_pre_attn_scalar to the heads'
width (`gemma_edits`, as llama.cpp scales queries): `tiny_gemma3` keeps the tiny byte-level
tokenizer (the converter's `_set_vocab_gpt2` for a Gemma 3 folder without tokenizer.model),
`tiny_gemma3_sentencepiece` (with a RoPE base of its own on the window layers) and
`tiny_gemma2_sentencepiece` take a Gemma-style SentencePiece tokenizer; `tiny_gemma3_mm` is
a multimodal Gemma 3 folder, whose text model the converter writes
(`gemma_spm_tokenizer_files`), which the converter writes without a space prefix. The Phi cases
name GPT2Tokenizer in tokenizer_config.json (`phi_edits`; the converter's Phi-3 class reads a
byte-level vocabulary only for that class, as Phi-4-mini's), `tiny_phi4` with Phi-4-mini's
partial LongRoPE; `tiny_phi3_sentencepiece` gives tiny Phi-3 the Llama-style SentencePiece
tokenizer, which the converter writes by its Phi-3 rules.
"""
import copy
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
VERSION = "0.3.36"

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Tokenized by Hugging Face tokenizers from each case's tokenizer.json (`encode(TEXT)`, special
# tokens added as its post-processor adds them): the ids the folder's prompt must be in edgetune
# and in llama.cpp. (Not transformers' AutoTokenizer: transformers 5 builds Qwen2's split from
# its Qwen2 tokenizer class whatever the tiny tokenizer.json declares.)
TEXT = "Paris is the capital of France. edgetune's 2024 run: I'VE 12345 apples\n\n<|im_end|>"


def fnv1a64(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def llama3_edits():
    with open(os.path.join(FIX, "tiny_llama", "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg["bos_token_id"] = 0
    with open(os.path.join(FIX, "tiny_tokenizer.json")) as f:
        tok = json.load(f)
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                  "tokens": ["<|endoftext|>"]}}}
    # The last three merges and the tokens they make go, so the tokenizer ends three ids short
    # of the model's 320 (the converter writes [PADi] there); the first of those ids goes to an
    # added token that is not special (llama.cpp's USER_DEFINED), where transformers puts it.
    vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
    top = sorted(vocab.items(), key=lambda x: -x[1])[:3]
    made = {"".join(m if isinstance(m, list) else m.split(" ")) for m in merges[-3:]}
    assert {t for t, _ in top} == made and max(i for _, i in top) == 319, (top, made)
    del merges[-3:]
    for t, _ in top:
        vocab.pop(t)
    tok["added_tokens"].append({"id": 317, "content": "edgetune", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})
    tc = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "bos_token": "<|endoftext|>",
          "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": True}
    return {"config.json": json.dumps(cfg, indent=1), "tokenizer.json": json.dumps(tok, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(tc, indent=1)}


SPM_TEXT = ["The quick brown fox jumps over the lazy dog.", "edgetune fine-tunes language models on any GPU.",
            "Paris is the capital of France. Berlin is the capital of Germany.",
            "Hello, world! 12345 tokens and more tokens."]


def sentencepiece_folder(name, text, tokenizer_config, **trainer):
    """A SentencePiece BPE model (byte fallback, 320 pieces, so that the tiny models'
    embeddings fit it; no normalization, digits split) trained on `text`, with the tokenizer.json
    and tokenizer_config.json that transformers converts it to from `tokenizer_config` (its
    tokenizer class and special tokens). Written to fixtures/`name`."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    out = os.path.join(FIX, name)
    shutil.rmtree(out, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix="spm-")
    with open(os.path.join(tmp, "corpus.txt"), "w") as f:
        f.write("\n".join(text * 30))
    # Relative paths, as the model records its trainer's input and prefix: the same bytes each run.
    here = os.getcwd()
    os.chdir(tmp)
    spm.SentencePieceTrainer.train(
        input="corpus.txt", model_prefix="sp", vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2, **trainer)
    os.chdir(here)
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    shutil.copy(os.path.join(tmp, "sp.model"), os.path.join(src, "tokenizer.model"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    shutil.copy(os.path.join(src, "tokenizer.model"), os.path.join(out, "tokenizer.model"))
    # transformers may record where it read the model from, a temporary folder.
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tc = json.load(f)
    if tc.pop("vocab_file", None) is not None:
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)
            f.write("\n")
    shutil.rmtree(tmp)
    return name


def spm_tokenizer_files():
    """A Llama 2 style SentencePiece tokenizer (unk 0, bos 1, eos 2, the dummy prefix) as
    transformers' LlamaTokenizer converts it. Written to fixtures/tiny_spm_tokenizer."""
    return sentencepiece_folder(
        "tiny_spm_tokenizer", SPM_TEXT,
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True},
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1)


def gemma_spm_tokenizer_files():
    """A Gemma-style SentencePiece tokenizer: Gemma's ids (pad 0, eos 1, bos 2, unk 3, then <mask>
    and the turn markers as user-defined pieces) and no dummy prefix (Gemma's tokenizer adds no
    space before the text), as transformers' GemmaTokenizer converts it. Written to
    fixtures/tiny_gemma_spm_tokenizer."""
    return sentencepiece_folder(
        "tiny_gemma_spm_tokenizer", SPM_TEXT + ["<start_of_turn>user Hi<end_of_turn>"],
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
         "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False},
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False)


def phi_edits(base):
    """The tiny Phi's tokenizer_config.json naming transformers' GPT2Tokenizer, as Phi-4-mini's
    does: the converter's Phi-3 class reads a byte-level vocabulary only for that class."""
    with open(os.path.join(FIX, base, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "GPT2Tokenizer"
    return {"tokenizer_config.json": json.dumps(tc, indent=1)}


def gemma_edits(base, generic_tokenizer=False, local_base=None, **ids):
    """The tiny Gemma's config.json with query_pre_attn_scalar = head_dim, as every published
    Gemma 2 and 3 below 27B has it (llama.cpp scales queries by 1 / sqrt(key_length), so the
    fixture's 24 would change the model; edgetune refuses that folder), and `ids` set. With
    `generic_tokenizer`, tokenizer_config.json names the generic tokenizer class: transformers'
    Gemma tokenizer class adds Gemma's special tokens past the tiny byte-level vocabulary, which
    the converter refuses. With `local_base`, the sliding-window layers' RoPE base."""
    with open(os.path.join(FIX, base, "config.json")) as f:
        cfg = json.load(f)
    text = cfg.get("text_config", cfg)  # a multimodal Gemma 3's text model
    text["query_pre_attn_scalar"] = text["head_dim"]
    cfg.update(ids)
    if local_base is not None:
        text["rope_parameters"]["sliding_attention"]["rope_theta"] = local_base
    edits = {"config.json": json.dumps(cfg, indent=1)}
    if generic_tokenizer:
        with open(os.path.join(FIX, base, "tokenizer_config.json")) as f:
            tc = json.load(f)
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        edits["tokenizer_config.json"] = json.dumps(tc, indent=1)
    return edits


CASES = [
    {"name": "tiny_llama", "base": "tiny_llama", "pre": "gpt-2", "edits": {}},
    {"name": "tiny_qwen2", "base": "tiny_qwen2", "pre": "gpt-2", "edits": {}},
    {"name": "tiny_qwen3", "base": "tiny_qwen3", "pre": "gpt-2", "edits": {}},
    {"name": "tiny_llama_llama3", "base": "tiny_llama", "pre": "llama-bpe", "edits": llama3_edits()},
    {"name": "tiny_llama_sentencepiece", "base": "tiny_llama", "files": "tiny_spm_tokenizer", "pre": None,
     "edits": {}},
    {"name": "tiny_gemma3", "base": "tiny_gemma3", "pre": "gpt-2", "edits": gemma_edits("tiny_gemma3", generic_tokenizer=True)},
    {"name": "tiny_gemma3_sentencepiece", "base": "tiny_gemma3", "files": "tiny_gemma_spm_tokenizer", "pre": None,
     "edits": gemma_edits("tiny_gemma3", local_base=20000.0, bos_token_id=2, eos_token_id=1)},
    {"name": "tiny_gemma2_sentencepiece", "base": "tiny_gemma2", "files": "tiny_gemma_spm_tokenizer", "pre": None,
     "edits": gemma_edits("tiny_gemma2", bos_token_id=2, eos_token_id=1)},
    {"name": "tiny_gemma3_mm", "base": "tiny_gemma3_mm", "pre": "gpt-2",
     "edits": gemma_edits("tiny_gemma3_mm", generic_tokenizer=True)},
    {"name": "tiny_phi3", "base": "tiny_phi3", "pre": "gpt-2", "edits": phi_edits("tiny_phi3")},
    {"name": "tiny_phi4", "base": "tiny_phi4", "pre": "gpt-2", "edits": phi_edits("tiny_phi4")},
    {"name": "tiny_phi3_sentencepiece", "base": "tiny_phi3", "files": "tiny_spm_tokenizer", "pre": None,
     "edits": {}},
]


def llama_cpp_source(work):
    """convert_hf_to_gguf.py, its conversion package and gguf-py from llama-cpp-python's sdist."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", work], check=True)
    with tarfile.open(os.path.join(work, f"llama_cpp_python-{VERSION}.tar.gz")) as t:
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        members = [m for m in t.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "conversion/")
            or m.name.startswith(prefix + "gguf-py/"))]
        t.extractall(work, members=members, filter="data")
    return os.path.join(work, prefix)


def value(field):
    import gguf
    t = field.types
    if t[0] == gguf.GGUFValueType.ARRAY:
        return ["ARRAY", t[1].name, field.contents()]
    return [t[0].name, field.contents()]


def main():
    work = tempfile.mkdtemp(prefix="hf-gguf-")
    src = llama_cpp_source(work)
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    sys.path.insert(0, src)
    import gguf
    from conversion import base
    spm_tokenizer_files()
    gemma_spm_tokenizer_files()
    from tokenizers import Tokenizer
    out = {"converter": f"llama-cpp-python {VERSION} convert_hf_to_gguf.py --outtype f32", "text": TEXT, "cases": []}
    for case in CASES:
        folder = os.path.join(work, case["name"])
        shutil.copytree(os.path.join(FIX, case["base"]), folder)
        if case.get("files"):
            shutil.copytree(os.path.join(FIX, case["files"]), folder, dirs_exist_ok=True)
        for name, text in case["edits"].items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        base.TextModel.get_vocab_base_pre = lambda self, tok, pre=case["pre"]: pre
        def convert(outtype):
            path = os.path.join(work, f"{case['name']}-{outtype}.gguf")
            sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", path, "--outtype", outtype]
            try:
                runpy.run_path(os.path.join(src, "convert_hf_to_gguf.py"), run_name="__main__")
            except SystemExit as e:
                if e.code:
                    raise
            r = gguf.GGUFReader(path)
            meta = {k: value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
            tensors = {t.name: {"shape": [int(d) for d in reversed(t.shape)], "type": t.tensor_type.name,
                                "fnv1a64": fnv1a64(bytes(t.data.tobytes()))} for t in r.tensors}
            return meta, tensors

        meta, tensors = convert("f32")
        # Quantized by gguf-py's Q8_0 (norms and other vectors kept F32): the types and bytes.
        q8_meta, q8_tensors = convert("q8_0")
        assert q8_meta["general.file_type"] == ["UINT32", 7], q8_meta["general.file_type"]
        ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(TEXT).ids
        out["cases"].append({**copy.deepcopy(case), "metadata": meta, "tensors": tensors, "q8_0_tensors": q8_tensors,
                             "tokenizers_ids": ids})
        print(case["name"], len(meta), "keys", len(tensors), "tensors", file=sys.stderr)
    with open(os.path.join(FIX, "hf_gguf_expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
