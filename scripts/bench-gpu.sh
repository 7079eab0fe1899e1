#!/usr/bin/env bash
# Speed on a machine with a GPU and no network: edgetune's LoRA training step (seq 512, r 16,
# all linear layers, gradient checkpointing on and off) and decoding on random weights of
# real shapes, against PyTorch + PEFT (+ bitsandbytes NF4 when it imports) on the same shapes,
# then one table with the ratio edgetune / PyTorch per shape. No model file is needed.
#
#   scripts/bench-gpu.sh [EDGETUNE_BINARY]
#
# The binary defaults to the release build of this checkout, then `edgetune` on the PATH; it
# may be built on another machine. SHAPES, SEQ, RANK, STEPS and BENCH_OUT (a folder that
# keeps the JSON lines; default a temporary one) override the defaults; TORCH=0 skips the
# PyTorch runs (the table then reads any torch.jsonl already in BENCH_OUT). PROFILE (a shape,
# default llama-3.2-1b; empty for none) adds one profiled training step of that shape
# (checkpointing off) whose per-kernel times and GFLOP/s go to profile.json, and the same in
# each family of FAMILIES to profile-FAMILY.json. Each shape's decoding run (128 prompt tokens,
# 32 decoded) also profiles one more prefill and 32 tokens (`bench --profile`: each kernel's time
# per token, and how much of a decoded token's time is spent in kernels at all). FAMILIES (default
# "tile128 tile128:0 portable half"; empty for none) lists kernel families whose training step
# is measured besides the one the adapter gets (EDGETUNE_KERNELS), so the table compares them
# (half, f16 arithmetic without matrix units, is never picked by the table: only measured); a
# family written FAMILY:N runs with EDGETUNE_TILE128_MIN_GROUPS=N (0: tile128's 128 x 128 tiles
# for every product, not only those with large grids), and the adapter's own family is
# measured with 0 too when it uses those tiles; FAMILY:N:W runs with EDGETUNE_NARROW_MAX=W as
# well (tile128::0: LoRA's narrow products on 64 x 64 blocks rather than 256 x 16 ones).
# CHECKS (default "all none"; empty for none) lists settings of EDGETUNE_SHADER_CHECKS whose
# training step (and profiled step) is measured in the adapter's family besides the default
# (bounds: wgpu's checks without its loop counters), so the table shows what wgpu's loop
# counters ("all") and its remaining checks ("none") cost.
# BUDGET_S (seconds; default none) starts no run after that many seconds and cuts each run's
# time limit to what is left, so a machine lent for a fixed time still ends with the table of
# what ran and the list of what did not. Needs the Vulkan loader (libvulkan.so.1) and the GPU
# driver's Vulkan ICD; python3 with torch, transformers and peft for the PyTorch column
# (skipped, and said so, when they do not import).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-}"
if [ -z "$bin" ]; then
  for c in "${CARGO_TARGET_DIR:-$here/../target}/release/edgetune" "$here/../target/release/edgetune" "$(command -v edgetune || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then bin="$c"; break; fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "bench-gpu.sh: no edgetune binary (give its path, or build it: cargo build --release -p edgetune-cli)" >&2
  exit 2
fi
shapes="${SHAPES:-smollm2-135m qwen2.5-0.5b llama-3.2-1b}"
seq="${SEQ:-512}"
rank="${RANK:-16}"
steps="${STEPS:-5}"
out="${BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$out"
: >"$out/edgetune.jsonl"
if ! { ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; } && [ -z "${LD_LIBRARY_PATH:-}" ]; then
  echo "bench-gpu.sh: no Vulkan loader (libvulkan.so.1) found; see the README's Benchmarks section" >&2
fi
"$bin" gpu || { echo "bench-gpu.sh: edgetune found no GPU adapter" >&2; exit 1; }
picked="$("$bin" gpu | sed -n 's/^kernels: \([a-z0-9]*\).*/\1/p')"
variants="${FAMILIES-tile128 tile128:0 portable half}"
case "$picked" in tile128 | coop16 | half) [ -n "$variants" ] && variants="$variants $picked:0" ;; esac
checks="${CHECKS-all none}"
# Runs "$@" with the kernels of variant $1 (FAMILY, FAMILY:N or FAMILY:N:W, see FAMILIES above).
with_kernels() {
  local v="$1" groups="" narrow=""
  shift
  case "$v" in *:*) groups="${v#*:}" ;; esac
  case "$groups" in *:*) narrow="${groups#*:}" groups="${groups%%:*}" ;; esac
  EDGETUNE_KERNELS="${v%%:*}" EDGETUNE_TILE128_MIN_GROUPS="$groups" EDGETUNE_NARROW_MAX="$narrow" "$@"
}
torch_ok=1
if [ "${TORCH:-1}" = 0 ]; then
  torch_ok=0
elif ! python3 -c 'import torch, transformers, peft; assert torch.cuda.is_available()' 2>/dev/null; then
  torch_ok=0
  echo "bench-gpu.sh: python3 with torch (CUDA), transformers and peft not found: no PyTorch column" >&2
fi
[ "$torch_ok" = 1 ] && : >"$out/torch.jsonl"
start=$SECONDS
skipped=()
# Runs "$@", a run labelled $1 that may take up to $2 seconds, within what is left of BUDGET_S.
run() {
  local label="$1" limit="$2"
  shift 2
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((BUDGET_S - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then
      skipped+=("$label")
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
  fi
  echo "== $label ($((SECONDS - start)) s)" >&2
  timeout "$limit" "$@" || echo "bench-gpu.sh: $label failed" >&2
}
train=(--seq "$seq" --rank "$rank" --max-context "$seq" --json)
for shape in $shapes; do
  run "$shape: edgetune bench-train" 300 "$bin" bench-train --random-weights "$shape" --steps "$steps" "${train[@]}" \
    >>"$out/edgetune.jsonl"
  for c in $checks; do
    EDGETUNE_SHADER_CHECKS="$c" run "$shape: edgetune bench-train, shader checks $c" 300 \
      "$bin" bench-train --random-weights "$shape" --steps "$steps" "${train[@]}" >>"$out/edgetune.jsonl"
  done
  for family in $variants; do
    [ "$family" = "$picked" ] && continue
    with_kernels "$family" run "$shape: edgetune bench-train, $family kernels" 300 \
      "$bin" bench-train --random-weights "$shape" --steps "$steps" "${train[@]}" >>"$out/edgetune.jsonl"
  done
  run "$shape: edgetune bench" 200 "$bin" bench --random-weights "$shape" --prompt-tokens 128 --decode-tokens 32 \
    --repeat 3 --max-context 512 --profile --json >>"$out/edgetune.jsonl"
  # The same with a fresh adapter applied (not merged), as generation with a named adapter runs;
  # then 8 sequences, each with its own adapter, decoded one after another and together.
  run "$shape: edgetune bench, LoRA r $rank applied, 8 rows" 200 "$bin" bench --random-weights "$shape" \
    --prompt-tokens 128 --decode-tokens 32 --repeat 1 --max-context 512 --lora-rank "$rank" --rows 8 --json \
    >>"$out/edgetune.jsonl"
  # Decoding over a long cache, with split-key attention and without (EDGETUNE_SPLIT_KEYS_BELOW=0).
  for below in "" 0; do
    EDGETUNE_SPLIT_KEYS_BELOW="$below" run "$shape: edgetune bench, 2048-token cache, split keys below ${below:-default}" \
      200 "$bin" bench --random-weights "$shape" --prompt-tokens 2048 --decode-tokens 32 --repeat 1 --max-context 2112 \
      --json >>"$out/edgetune.jsonl"
  done
  if [ "$torch_ok" = 1 ]; then
    run "$shape: PyTorch + PEFT" 300 python3 "$here/bench_torch.py" --shape "$shape" --seq "$seq" --rank "$rank" \
      --steps "$steps" --decode-tokens 32 >>"$out/torch.jsonl"
  fi
done
profile="${PROFILE-llama-3.2-1b}"
if [ -n "$profile" ]; then
  profiled=(--random-weights "$profile" --steps 1 --checkpointing off --profile "${train[@]}")
  run "$profile: edgetune bench-train --profile" 300 "$bin" bench-train "${profiled[@]}" >"$out/profile.json"
  for c in $checks; do
    EDGETUNE_SHADER_CHECKS="$c" run "$profile: edgetune bench-train --profile, shader checks $c" 300 \
      "$bin" bench-train "${profiled[@]}" >"$out/profile-checks-$c.json"
  done
  # The same step in each other family, so the tables compare them kernel by kernel.
  for family in $variants; do
    [ "$family" = "$picked" ] && continue
    with_kernels "$family" run "$profile: edgetune bench-train --profile, $family kernels" 300 \
      "$bin" bench-train "${profiled[@]}" >"$out/profile-${family//:/-}.json"
  done
fi
if [ "${#skipped[@]}" -gt 0 ]; then
  echo "bench-gpu.sh: BUDGET_S=$BUDGET_S ran out before ${#skipped[@]} runs, left out:"
  printf '  %s\n' "${skipped[@]}"
fi
# A profile left out by the budget left an empty file behind its redirection.
find "$out" -name 'profile*.json' -empty -delete
echo "== done in $((SECONDS - start)) s; JSON lines in $out" >&2
python3 "$here/bench_table.py" "$out"
