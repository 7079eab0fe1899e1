#!/usr/bin/env bash
# The automatic training settings on a larger set: the English dialogues of chatterbot-corpus
# 1.3.3 (PyPI; 2,026 records, 899 once duplicates are dropped) trained with the defaults on
# SmolLM2-135M-Instruct. `train` prints each automatic choice and its reason (README, *Training
# defaults*) and the validation loss at each evaluation; the run's time is printed last.
#
#   bash scripts/large-set.sh [TRAIN FLAGS...]     # e.g. --max-steps 4 for a quick check
#
# EDGETUNE_LARGE_SET=FILE trains on that JSONL instead of building it (on a machine without
# PyPI, carry the file this script wrote, printed at its start); EDGETUNE_MODEL names another
# model; the run goes to EDGETUNE_RUN_DIR (default ~/.cache/edgetune/runs/large-set).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo build --release --locked -p edgetune-cli
bin="$CARGO_TARGET_DIR/release/edgetune"
model="${EDGETUNE_MODEL:-$(bash scripts/fetch-model.sh)}"
out="${EDGETUNE_RUN_DIR:-$HOME/.cache/edgetune/runs/large-set}"
data="${EDGETUNE_LARGE_SET:-}"
if [ -z "$data" ]; then
  # chatterbot-corpus and PyYAML in a virtual environment of their own, kept by version.
  venv="$HOME/.cache/edgetune/chatterbot-corpus-1.3.3"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import chatterbot_corpus, yaml" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet chatterbot-corpus==1.3.3 pyyaml==6.0.3
  fi
  data="$venv/chatterbot-english.jsonl"
  [ -s "$data" ] || "$venv/bin/python" scripts/chatterbot_jsonl.py "$data"
fi
echo "data: $data ($(wc -l < "$data") records)"
"$bin" gpu
rm -rf "$out"
start=$(date +%s)
"$bin" train --model "$model" --data "$data" --output "$out" "$@"
echo "trained in $(( $(date +%s) - start )) s (the model's loading included)"
