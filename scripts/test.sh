#!/usr/bin/env bash
# Runs every test: the CPU format tests, every WGSL kernel against its CPU twin on the GPU
# adapter wgpu finds (lavapipe on a machine without a GPU), parity with transformers and the
# SmolLM2 checks.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo test --workspace --locked
