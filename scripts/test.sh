#!/usr/bin/env bash
# Runs every test: the CPU format tests, every WGSL kernel against its CPU twin on the GPU
# adapter wgpu finds (lavapipe on a machine without a GPU), parity with transformers and the
# SmolLM2 checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgetune/target}"
cargo test --workspace --locked
