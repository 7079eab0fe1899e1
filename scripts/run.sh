#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, load it with NF4 weights on the GPU and chat with
# it. (Fine-tuning joins this script when training lands.)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo build --release --locked -p edgetune
bin="$CARGO_TARGET_DIR/release/edgetune"
model="$(bash scripts/fetch-model.sh)"
"$bin" gpu
"$bin" info "$model"
for q in "What is the capital of France?" "Write one sentence about the sea."; do
  echo; echo "> $q"
  "$bin" generate --model "$model" --chat --prompt "$q" --max-tokens 48
done
