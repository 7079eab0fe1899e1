#!/usr/bin/env bash
# Installs llama.cpp, the judge of edgetune's GGUF adapters and merged GGUF files, through the
# PyPI package llama-cpp-python (which builds llama.cpp from its source distribution), with
# gguf-py, numpy and sentencepiece (the judge of the tokenizer.model files edgetune writes),
# into a virtual environment kept outside the clone and keyed by version, so a machine builds
# it once. Prints the environment's python on the last line.
#
#   scripts/llama-cpp.sh
set -euo pipefail
version=0.3.36
gguf_version=0.19.0
sentencepiece_version=0.2.3
venv="$HOME/.cache/edgetune/llama-cpp-$version"
py="$venv/bin/python"
if ! "$py" -c "import llama_cpp, gguf, numpy" >/dev/null 2>&1; then
  echo "llama-cpp.sh: building llama-cpp-python $version (llama.cpp from source, CPU only; minutes, once per machine)" >&2
  rm -rf "$venv.partial"
  python3 -m venv "$venv.partial"
  # Portable CPU code (no -march=native): the cache may outlive the machine that built it.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv.partial/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==$version" "gguf==$gguf_version" numpy \
      "sentencepiece==$sentencepiece_version" >&2
  # The venv's scripts name their folder: install under the final name by moving, then check.
  rm -rf "$venv"
  mv "$venv.partial" "$venv"
  sed -i "s|$venv.partial|$venv|g" "$venv"/bin/* 2>/dev/null || true
  "$py" -c "import llama_cpp, gguf, numpy" >&2
fi
# An environment built before sentencepiece joined it gets the wheel added (seconds).
if ! "$py" -c "import sentencepiece" >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet --no-cache-dir "sentencepiece==$sentencepiece_version" >&2
  "$py" -c "import sentencepiece" >&2
fi
echo "$py"
