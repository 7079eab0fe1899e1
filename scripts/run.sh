#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, ask it the held-out persona questions, fine-tune a
# LoRA adapter on the bundled persona dataset (NF4 base on the GPU, progress bar), then ask the
# same questions again with the adapter applied.
#
# On a machine without a GPU this runs on Mesa's lavapipe (the CPU) and training takes about an
# hour on two cores; with a GPU it takes seconds to minutes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo build --release --locked -p edgetune
bin="$CARGO_TARGET_DIR/release/edgetune"
model="$(bash scripts/fetch-model.sh)"
data=sdk/data/persona
out="${EDGETUNE_RUN_DIR:-$HOME/.cache/edgetune/runs/persona}"
"$bin" gpu
echo
echo "=== before training: the base model ==="
"$bin" generate --model "$model" --chat --prompts-file "$data/held_out.txt" --max-tokens 40
echo "=== training on $data/train.jsonl ==="
"$bin" train --model "$model" --data "$data/train.jsonl" --config "$data/train.toml" --output "$out"
echo
echo "=== after training: the same questions with the adapter ($out/adapter) ==="
"$bin" generate --model "$model" --adapter "$out/adapter" --chat --prompts-file "$data/held_out.txt" --max-tokens 40
