#!/usr/bin/env bash
# The GPU tests on a machine with a GPU and no Rust toolchain: the test binaries are built on
# another machine, carried, and run against this checkout's fixtures.
#
#   scripts/gpu-tests.sh pack DIR   # here: build the test binaries, strip and gzip them into DIR
#   scripts/gpu-tests.sh run DIR    # there: run each one in DIR, then one summary line
#
# The binaries are those whose tests run on the GPU adapter against CPU twins and PEFT
# fixtures: kernels, gradients, model_parity, peft_parity, training and dpo_parity (TESTS
# overrides the list). `run` runs each from this checkout's tests/ folder with
# EDGETUNE_FIXTURES naming its fixtures (the binaries carry the path of the checkout they were
# built in), each within TEST_TIMEOUT seconds (default 600), prints each binary's result line,
# the output of any that failed, and "gpu-tests: N passed, M failed"; it exits non-zero when a
# test failed or a binary did not finish. On a GPU the per-family tests run the family the
# table picks and every other one the adapter can run, the cooperative-matrix kernels on the
# matrix units where the adapter lists them. Needs the Vulkan loader (see the README's
# Benchmarks section). BUDGET_S (seconds; default none) starts no binary after that many
# seconds and cuts each one's limit to what is left; those left out are named and counted, and
# the run then exits non-zero. It also says how many kernels the tests dispatched and which
# cooperative-matrix kernels ran on the matrix units (EDGETUNE_KERNEL_LOG).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
tests="${TESTS:-kernels gradients model_parity peft_parity training dpo_parity}"
mode="${1:-}"
dir="${2:-}"
if [ -z "$dir" ] || { [ "$mode" != pack ] && [ "$mode" != run ]; }; then
  echo "usage: scripts/gpu-tests.sh pack|run DIR" >&2
  exit 2
fi

if [ "$mode" = pack ]; then
  set -e
  mkdir -p "$dir"
  args=()
  for t in $tests; do args+=(--test "$t"); done
  # cargo prints each test executable it built as a JSON line with an "executable" field.
  cargo test --locked -p edgetune-tests "${args[@]}" --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$dir/$name"
    strip "$dir/$name" 2>/dev/null || true
    gzip -9f "$dir/$name"
    echo "gpu-tests.sh: $dir/$name.gz ($(du -k "$dir/$name.gz" | cut -f1) KiB)"
  done
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Each test process appends the kernels it dispatches (once each) here: the summary names the
# cooperative-matrix kernels that ran on the matrix units, not as their emulated twins.
export EDGETUNE_KERNEL_LOG="$work/kernels.txt"
passed=0
failed=0
left_out=0
begin=$SECONDS
for t in $tests; do
  limit="${TEST_TIMEOUT:-600}"
  if [ -n "${BUDGET_S:-}" ]; then
    left=$((BUDGET_S - (SECONDS - begin)))
    if [ "$left" -lt 20 ]; then
      echo "$t: left out, BUDGET_S=$BUDGET_S spent"
      left_out=$((left_out + 1))
      continue
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
  fi
  if [ -f "$dir/$t.gz" ]; then
    gzip -dc "$dir/$t.gz" >"$work/$t"
  elif [ -f "$dir/$t" ]; then
    cp "$dir/$t" "$work/$t"
  else
    echo "$t: not in $dir"
    failed=$((failed + 1))
    continue
  fi
  chmod +x "$work/$t"
  start=$SECONDS
  (cd "$root/tests" && EDGETUNE_FIXTURES="$root/tests/reference/fixtures" \
    timeout "$limit" "$work/$t") >"$work/$t.log" 2>&1
  rc=$?
  result="$(grep -E '^test result:' "$work/$t.log" | tail -n 1)"
  n_passed=$(grep -Eo '[0-9]+ passed' <<<"$result" | awk '{print $1 + 0}')
  n_failed=$(grep -Eo '[0-9]+ failed' <<<"$result" | awk '{print $1 + 0}')
  passed=$((passed + ${n_passed:-0}))
  if [ "$rc" -ne 0 ]; then
    # A binary that failed no test but did not finish (a crash, the timeout) counts as one.
    failed=$((failed + (${n_failed:-0} > 0 ? ${n_failed:-0} : 1)))
    echo "$t: exit $rc after $((SECONDS - start)) s; ${result:-no result line}"
    grep -vE '^test .* ok$|max abs diff' "$work/$t.log" | tail -n 60
  else
    echo "$t: $result ($((SECONDS - start)) s)"
  fi
done
if [ -s "$work/kernels.txt" ]; then
  coop="$({ grep -E '[.]coop(16|8)([.]|$)' "$work/kernels.txt" || true; } | { grep -v '[.]emulated$' || true; } | sort -u | paste -sd ' ' -)"
  echo "gpu-tests: $(sort -u "$work/kernels.txt" | wc -l) kernels dispatched; on the matrix units: ${coop:-none}"
fi
echo "gpu-tests: $passed passed, $failed failed$([ "$left_out" -gt 0 ] && echo ", $left_out binaries left out")"
[ "$failed" -eq 0 ] && [ "$left_out" -eq 0 ]
