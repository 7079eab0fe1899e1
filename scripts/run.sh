#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, load it with NF4 weights on the GPU and chat with
# it. (Fine-tuning joins this script when training lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgetune/target}"
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
cargo build --release --locked -p edgetune
bin="$CARGO_TARGET_DIR/release/edgetune"
model="$(bash scripts/fetch-model.sh)"
"$bin" gpu
"$bin" info "$model"
for q in "What is the capital of France?" "Write one sentence about the sea."; do
  echo; echo "> $q"
  "$bin" generate --model "$model" --chat --prompt "$q" --max-tokens 48
done
