#!/usr/bin/env python3
"""Writes the English dialogues of chatterbot-corpus (the PyPI package) as chat records, one JSON
object a line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}.

Each dialogue's lines alternate user and assistant from its first; a dialogue with an odd number
of lines loses its last (an unanswered question), and one with fewer than two is left out.

    python chatterbot_jsonl.py OUT.jsonl
"""
import glob
import json
import os
import sys

import chatterbot_corpus
import yaml


def main():
    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    files = sorted(glob.glob(os.path.join(root, "*.yml")))
    if not files:
        sys.exit(f"no .yml files under {root}")
    n = 0
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        for path in files:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
            for dialogue in doc.get("conversations") or []:
                lines = [str(t).strip() for t in dialogue if str(t).strip()]
                lines = lines[: len(lines) // 2 * 2]
                if not lines:
                    continue
                roles = ["user", "assistant"]
                msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(lines)]
                out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
                n += 1
    print(f"{n} dialogues from {len(files)} files of {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
