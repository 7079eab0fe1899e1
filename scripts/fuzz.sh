#!/usr/bin/env bash
# Fuzzes every parser that reads input from outside (the targets in fuzz/fuzz_targets) with
# libFuzzer through cargo-fuzz, each for SECONDS (default 30), seeded from the repository's
# fixtures, then prints one line per target: executions, and whether it crashed. The targets
# run side by side, one a core (FUZZ_JOBS overrides the number of cores).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# The long runs (a million executions and more per target) are this script with a larger
# SECONDS, started by a person; the test command runs it briefly so the harness stays alive.
# Limits: no allocation over 1 GiB (-malloc_limit_mb), 2 GiB of RSS, 10 s per input. A crash,
# an abort, a hang or an allocation over the limit fails the run; libFuzzer saves the input in
# fuzz/artifacts/TARGET/, which then belongs in a regression test. Builds on the stable
# toolchain (RUSTC_BOOTSTRAP lets it take libFuzzer's instrumentation flags), without a
# sanitizer: Rust's own checks (bounds, overflow, debug assertions) are on.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
seconds="${1:-30}"
shift || true
all="gguf safetensors model_config tokenizer_config data settings peft checkpoint batch"
targets="${*:-$all}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/edgetune/fuzz-target}"
bash "$here/bound-cache.sh" "$CARGO_TARGET_DIR" 6
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --version 0.13.2 --locked || { echo "fuzz.sh: could not install cargo-fuzz" >&2; exit 2; }
fi
cd "$root" || exit 2
cargo fuzz build -s none -O || { echo "fuzz.sh: the fuzz targets do not build" >&2; exit 2; }

# Seed corpora from the fixtures, in a folder outside the repository that keeps what the
# fuzzer finds between runs.
corpus="${FUZZ_CORPUS:-$HOME/.cache/edgetune/fuzz-corpus}"
bash "$here/bound-cache.sh" "$corpus" 1
fx="$root/tests/reference/fixtures"
seed() { mkdir -p "$corpus/$1"; cp "$2" "$corpus/$1/seed-$(basename "$2")" 2>/dev/null; }
pair() { # split2 format: a 2-byte little-endian length, the first file, then the second.
  python3 - "$@" <<'PY'
import struct, sys
a, b, out = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read(), sys.argv[3]
open(out, 'wb').write(struct.pack('<H', len(a)) + a + b)
PY
}
gguf_seed() { # a minimal GGUF v3 with a llama tokenizer's metadata and one F32 tensor
  python3 - "$1" <<'PY'
import struct, sys
def s(v): b = v.encode(); return struct.pack('<Q', len(b)) + b
kv = [('general.architecture', 8, s('llama')), ('tokenizer.ggml.model', 8, s('llama')),
      ('tokenizer.ggml.tokens', 9, struct.pack('<IQ', 8, 3) + s('a') + s('b') + s('ab')),
      ('tokenizer.ggml.scores', 9, struct.pack('<IQ', 6, 3) + struct.pack('<3f', 0, 0, -1)),
      ('llama.block_count', 4, struct.pack('<I', 1)), ('llama.embedding_length', 4, struct.pack('<I', 8))]
out = b'GGUF' + struct.pack('<IQQ', 3, 1, len(kv))
for k, t, v in kv:
    out += s(k) + struct.pack('<I', t) + v
out += s('token_embd.weight') + struct.pack('<I', 1) + struct.pack('<Q', 4) + struct.pack('<I', 0) + struct.pack('<Q', 0)
out += b'\0' * (-len(out) % 32) + struct.pack('<4f', 1, 2, 3, 4)
open(sys.argv[1], 'wb').write(out)
PY
}
mkdir -p "$corpus"/{gguf,safetensors,model_config,tokenizer_config,data,settings,peft,checkpoint,batch}
gguf_seed "$corpus/gguf/seed-minimal.gguf"
seed safetensors "$fx/peft_llama_adapter/adapter_model.safetensors"
seed model_config "$fx/tiny_llama/config.json"
seed model_config "$fx/tiny_llama/generation_config.json"
seed tokenizer_config "$fx/tiny_llama/tokenizer_config.json"
seed data "$root/sdk/data/persona/train.jsonl"
seed data "$root/tests/data/facts/train.jsonl"
seed settings "$root/sdk/data/persona/train.toml"
cat >"$corpus/batch/seed-jobs.jsonl" <<'JOBS'
# two users, one with its own settings
{"user": "alice", "data": "alice.jsonl", "config": {"epochs": 2, "lora": {"r": 8}}}
{"user": "Bob.Smith", "data": "/data/bob.jsonl"}
{"user": "ALICE", "data": "a.jsonl", "config": {"learning_rate": 1e-4, "data": {"val_fraction": 0.0}}}
JOBS
pair "$fx/peft_llama_adapter/adapter_config.json" "$fx/peft_llama_adapter/adapter_model.safetensors" "$corpus/peft/seed-pair"
pair "$fx/peft_llama_adapter/adapter_model.safetensors" "$fx/peft_llama_adapter/adapter_model.safetensors" "$corpus/checkpoint/seed-pair"

# One target a core at a time (libFuzzer runs one process on one core), each into its own log,
# reported in the order of the list once all have run.
cores="${FUZZ_JOBS:-$(nproc)}"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
fuzz_one() {
  local t="$1"
  cargo fuzz run -s none -O "$t" "$corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -timeout=10 -max_len=65536 -print_final_stats=1 >"$logs/$t.log" 2>&1
  echo $? >"$logs/$t.rc"
}
for t in $targets; do
  while [ "$(jobs -rp | wc -l)" -ge "$cores" ]; do wait -n; done
  echo "== $t: ${seconds} s" >&2
  fuzz_one "$t" &
done
wait
status=0
report=""
for t in $targets; do
  log="$logs/$t.log"
  rc=$(cat "$logs/$t.rc" 2>/dev/null || echo 1)
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" 2>/dev/null | grep -Eo '[0-9]+$' | tail -1)
  if [ "$rc" -ne 0 ]; then
    status=1
    tail -40 "$log" >&2
    report+="$t: FAILED after ${runs:-?} executions (input saved in fuzz/artifacts/$t/)"$'\n'
  else
    report+="$t: ${runs:-?} executions, no crash"$'\n'
  fi
done
echo
printf '%s' "$report"
exit "$status"
