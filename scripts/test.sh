#!/usr/bin/env bash
# Runs every test: the CPU format tests, every WGSL kernel against its CPU twin on the GPU
# adapter wgpu finds (lavapipe on a machine without a GPU), parity with transformers and the
# SmolLM2 checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgetune/target}"
# Mesa's Vulkan loader probes window-system sockets under XDG_RUNTIME_DIR and complains on
# headless machines when it is unset; give it a private empty one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
cargo test --workspace --locked
