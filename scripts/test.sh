#!/usr/bin/env bash
# Runs every test: the CPU format tests, every WGSL kernel against its CPU twin on the GPU
# adapter wgpu finds (lavapipe on a machine without a GPU), parity with transformers and the
# SmolLM2 checks. Ends with one summary line over all test binaries.
set -euo pipefail
source "$(dirname "$0")/env.sh"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# The C tests link the C library, which `cargo test` does not build (it is no Rust dependency).
{ cargo build --locked -p edgetune-capi && cargo test --workspace --locked --doc && cargo test --workspace --locked --all-targets; } 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
echo
echo "summary: $passed passed, $failed failed"
exit "$status"
