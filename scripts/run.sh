#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, ask it the held-out persona questions, fine-tune a
# LoRA adapter on the bundled persona dataset (the base's own 4-bit Q4_1 blocks on the GPU,
# progress bar), then ask the same questions again with the adapter applied. Each answer is
# scored against the persona's own (exact match, token F1, ROUGE-L), base against adapter.
#
# On a machine without a GPU this runs on Mesa's lavapipe (the CPU) and training takes about
# 5 minutes on two cores; with a GPU it takes seconds.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo build --release --locked -p edgetune-cli
bin="$CARGO_TARGET_DIR/release/edgetune"
model="$(bash scripts/fetch-model.sh)"
data=sdk/data/persona
out="${EDGETUNE_RUN_DIR:-$HOME/.cache/edgetune/runs/persona}"
# Ask with the system message the data is trained with (train.toml's [data] system).
system="$(sed -n 's/^system = "\(.*\)"$/\1/p' "$data/train.toml")"
"$bin" gpu
echo
echo "=== before training: the base model ==="
"$bin" eval --model "$model" --data "$data/held_out.jsonl" --system "$system" --generate --max-tokens 40
echo "=== training on $data/train.jsonl ==="
# train.toml sets only the system message; every other setting is chosen from the data and
# printed when training starts (see the README's "Training defaults").
"$bin" train --model "$model" --data "$data/train.jsonl" --config "$data/train.toml" --output "$out"
echo
echo "=== after training: the same questions with the adapter ($out/adapter) ==="
"$bin" eval --model "$model" --adapter "$out/adapter" --data "$data/held_out.jsonl" --system "$system" \
  --generate --max-tokens 40 --report "$out/answers.json"
