"""Judges a tokenizer.model that edgetune wrote from a GGUF file's SentencePiece vocabulary with
SentencePiece itself (the sentencepiece package from PyPI, in the Python of
scripts/llama-cpp.sh), reading the GGUF file with gguf-py. Run by tests/llama_cpp.rs.

    python sentencepiece_model.py OURS.model ORIGINAL.model FILE.gguf TEXT

Prints one JSON object: `pieces` (how many SentencePiece loads), `gguf_tokens`, `mismatches`
(each id whose piece text, score or kind differs from the file's token, at most 20; the kind
is what llama.cpp's converter asks SentencePiece: unknown, control, unused or byte, else
normal for the file's normal and user-defined tokens; where no token has the unknown type,
the token the file names as unknown must be SentencePiece's unknown piece), `trailing` (the file's tokens past the pieces,
which must be the converter's `[PADi]` placeholders) and the ids each model encodes TEXT to.
"""
import json
import sys

import gguf
import sentencepiece as spm


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    values = [f.parts[i] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(v).decode("utf-8") for v in values]
    return [v.tolist()[0] for v in values]


def main():
    ours_path, original_path, gguf_path, text = sys.argv[1:5]
    ours = spm.SentencePieceProcessor(model_file=ours_path)
    original = spm.SentencePieceProcessor(model_file=original_path)
    r = gguf.GGUFReader(gguf_path)
    tokens = field(r, "tokenizer.ggml.tokens")
    scores = field(r, "tokenizer.ggml.scores")
    types = field(r, "tokenizer.ggml.token_type")
    named = field(r, "tokenizer.ggml.unknown_token_id")
    typed = [i for i, t in enumerate(types) if t == 2]
    unk = typed[0] if typed else named[0] if named else None
    kinds = {2: "unknown", 3: "control", 5: "unused", 6: "byte"}
    mismatches = []
    n = ours.get_piece_size()
    for i in range(min(n, len(tokens))):
        got = (ours.id_to_piece(i), ours.get_score(i),
               "unknown" if ours.is_unknown(i) else "control" if ours.is_control(i)
               else "unused" if ours.is_unused(i) else "byte" if ours.is_byte(i) else "normal")
        kind = "unknown" if i == unk else kinds.get(types[i], "normal")
        want = (tokens[i], float(scores[i]), kind)
        if got != want and len(mismatches) < 20:
            mismatches.append({"id": i, "sentencepiece": got, "gguf": want})
    print(json.dumps({
        "pieces": n,
        "gguf_tokens": len(tokens),
        "mismatches": mismatches,
        "trailing": [t for i, t in enumerate(tokens) if i >= n and not (t == f"[PAD{i}]" and types[i] == 5)],
        "ours_ids": ours.encode(text),
        "original_ids": original.encode(text),
    }))


if __name__ == "__main__":
    main()
