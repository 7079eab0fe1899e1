#!/usr/bin/env bash
# Runs every test: the CPU format tests, every WGSL kernel against its CPU twin on the GPU
# adapter wgpu finds (lavapipe on a machine without a GPU), parity with transformers and the
# SmolLM2 checks, GGUF adapters and merges judged by llama.cpp, the Python package's tests, and
# a brief run of every fuzz target (scripts/fuzz.sh), and `cargo package` of each crate that
# publishes. Ends with one summary line over all.
set -euo pipefail
source "$(dirname "$0")/env.sh"
log="$(mktemp)"
vglog="$(mktemp)"
pylog="$(mktemp)"
fuzzlog="$(mktemp)"
wheels="$(mktemp -d)"
# Every process of the run that opens a GPU context (test binaries, the CLI they spawn, the C
# and Python tests) appends the name of each kernel it dispatches here; the last check holds
# the names to every kernel lavapipe can run.
kernellog="$(mktemp)"
export EDGETUNE_KERNEL_LOG="$kernellog"
vgpid=""
cleanup() {
  # The cycle runs in a process group of its own (setsid): valgrind goes with its test.
  if [ -n "$vgpid" ]; then kill -- "-$vgpid" 2>/dev/null || kill "$vgpid" 2>/dev/null || true; fi
  rm -f "$log" "$vglog" "$pylog" "$fuzzlog" "$kernellog"
  rm -rf "$wheels"
}
trap cleanup EXIT
status=0
# Seconds since the last call, for the log's "time:" lines (where a slow run spent its time).
mark=$SECONDS
lap() {
  echo "time: $1 $((SECONDS - mark)) s"
  mark=$SECONDS
}
# llama.cpp (built once per machine into ~/.cache/edgetune) judges the GGUF adapters and merges;
# if it cannot be built, those tests fail on their own, naming why.
if py="$(bash "$(dirname "$0")/llama-cpp.sh")"; then
  EDGETUNE_LLAMA_CPP_PYTHON="$(tail -n 1 <<<"$py")"
  export EDGETUNE_LLAMA_CPP_PYTHON
else
  echo "test.sh: scripts/llama-cpp.sh failed; the llama.cpp tests will fail" >&2
fi
lap "llama.cpp"
# The C cycle under valgrind (bindings/c/tests/c_programs.rs) keeps one core busy for up to a
# quarter of an hour where Mesa's shader cache is cold, most of it lavapipe compiling the
# kernels under valgrind: it starts as soon as the test binaries are built and runs beside
# everything else, and its outcome joins the count at the end.
valgrind_test=the_cycle_runs_clean_under_valgrind
start_valgrind() {
  local exe
  exe="$(sed -n 's/^ *Executable tests\/c_programs\.rs (\(.*\))$/\1/p' "$log" | tail -n 1)"
  if [ -z "$exe" ]; then
    echo "test.sh: no c_programs test binary in cargo's output" >"$vglog"
    return
  fi
  (cd bindings/c && exec setsid "$exe" --exact "$valgrind_test") >"$vglog" 2>&1 &
  vgpid=$!
}
# The C tests link the C library, which `cargo test` does not build (it is no Rust dependency).
{ cargo build --locked -p edgetune-capi && cargo test --workspace --locked --all-targets --no-run; } 2>&1 | tee "$log" || status=$?
lap "build"
if [ "$status" -eq 0 ]; then start_valgrind; else echo "test.sh: the build failed, so the valgrind cycle did not run" >"$vglog"; fi
{ cargo test --workspace --locked --doc && cargo test --workspace --locked --all-targets --no-fail-fast -- --skip "$valgrind_test"; } 2>&1 | tee -a "$log" || status=$?
lap "cargo test"
# The tests a libtest log reports passed, and failed.
libtest_passed() { { grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$1" || true; } | awk '{s += $4} END {print s + 0}'; }
libtest_failed() { { grep -Eo '[0-9]+ failed;' "$1" || true; } | awk '{s += $1} END {print s + 0}'; }
passed=$(libtest_passed "$log")
failed=$(libtest_failed "$log")
# A build error or a killed run fails no test of its own: count it, so the summary never reads
# "0 failed" for a run that did not finish.
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "cargo exited with status $status outside any test (a build error, or the run was stopped)"
  failed=1
fi
# One check outside cargo test: runs the command, shows its output only when it fails, and
# counts it as a test.
check() {
  local name="$1" out
  shift
  out="$(mktemp)"
  if "$@" >"$out" 2>&1; then
    echo "$name: ok"
    passed=$((passed + 1))
  else
    cat "$out"
    echo "$name: FAILED"
    failed=$((failed + 1))
    status=1
  fi
  rm -f "$out"
  lap "$name"
}
# The crates that publish pass `cargo publish --dry-run` (packaging, manifests, and resolution
# against crates.io's index, each crate's siblings through a local overlay registry), in
# dependency order. `--no-verify`: that each builds and passes its unit tests from its .crate
# file alone is the next check's, which builds in the workspace's target folder and so
# shares its dependencies' builds (the verification built them all again, at opt-level 0, in
# a folder of its own: eight minutes where that folder was cold).
msrv_crates="edgetune-shaders edgetune edgetune-cli edgetune-capi"
crates="$msrv_crates edgetune-demo"
packages=$(printf -- '-p %s ' $crates)
publish_target="$HOME/.cache/edgetune/publish-target"
check "cargo publish --dry-run $crates" env CARGO_TARGET_DIR="$publish_target" \
  cargo publish --dry-run --no-verify --locked --allow-dirty $packages
# Their unit tests pass from the .crate files alone, unpacked in a scratch folder (each crate's
# sibling dependencies patched to the unpacked siblings). The C crate's load the repository's
# tiny models, named by EDGETUNE_FIXTURES. An unpacked crate is a workspace of its own, without
# the workspace's [profile] sections: the dependencies' settings are given here as they are in
# Cargo.toml, so that their builds from `cargo test` above serve (built to another profile,
# each dependency compiled again: thirteen minutes where none had been). The five crates
# themselves build unoptimized: they compile once for each crate that uses them (each resolves
# its own features), faster so than optimized, and their unit tests are short (at opt-level 2
# this check took 295 s, at 0 121 s, on two cores with the dependencies built).
profile_config=(
  --config 'profile.dev.debug="line-tables-only"' --config 'profile.test.debug="line-tables-only"'
  --config 'profile.dev.package."*".opt-level=2' --config 'profile.dev.package."*".debug=false'
)
for sibling in edgetune edgetune-shaders; do
  profile_config+=(--config "profile.dev.package.$sibling.opt-level=0" --config "profile.dev.package.$sibling.debug=\"line-tables-only\"")
done
unit_tests_in() {
  local dir="$1" fixtures="$PWD/tests/reference/fixtures" version c
  version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
  for c in $crates; do tar -m -xzf "$publish_target/package/$c-$version.crate" -C "$dir" || return 1; done
  for c in $crates; do
    (cd "$dir/$c-$version" && EDGETUNE_FIXTURES="$fixtures" cargo test --offline --lib --bins "${profile_config[@]}" \
      --config "patch.crates-io.edgetune-shaders.path=\"$dir/edgetune-shaders-$version\"" \
      --config "patch.crates-io.edgetune.path=\"$dir/edgetune-$version\"") || return 1
  done
}
unit_tests_from_crate_files() {
  local dir ok=0
  # One folder in the target folder, emptied each run, not a new one: cargo names a path
  # crate's build after its path, so each new folder left a new copy of these crates' builds
  # (over a GiB) in the target folder, which then filled past its bound every few runs and was
  # emptied. The files are unpacked with the time of unpacking (tar -m): a .crate file dates
  # every file 2006-07-24, which cargo would take for sources older than the last run's build.
  dir="$CARGO_TARGET_DIR/crate-files"
  rm -rf "$dir" && mkdir -p "$dir" || return 1
  # The .crate files of this tree (the dry run above keeps its own in a folder of cargo's).
  rm -f "$publish_target"/package/*.crate
  env CARGO_TARGET_DIR="$publish_target" cargo package --no-verify --locked --allow-dirty $packages || return 1
  unit_tests_in "$dir" || ok=1
  rm -rf "$dir"
  return "$ok"
}
check "unit tests from the .crate files of $crates" unit_tests_from_crate_files
# Their documentation builds without a warning (every public item of the library has a doc
# comment: it denies missing docs).
check "cargo doc $crates" env RUSTDOCFLAGS="-D warnings" cargo doc --locked --offline --no-deps $packages
# The same crates build with the toolchain of their minimum supported Rust version, all
# targets, in a target folder of its own (setup.sh installs both): rust-version in Cargo.toml
# for all but the demo, whose egui needs the newer one in demo-app/Cargo.toml.
msrv="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)"
check "cargo +$msrv check $msrv_crates" env CARGO_TARGET_DIR="$HOME/.cache/edgetune/msrv-target" \
  cargo "+$msrv" check --locked --all-targets $(printf -- '-p %s ' $msrv_crates)
demo_msrv="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' demo-app/Cargo.toml)"
# Where that toolchain is the very compiler of the builds above (the demo's minimum is often the
# newest stable), its check shares their target folder and what `cargo doc` checked there.
demo_target="$HOME/.cache/edgetune/msrv-target"
if [ "$(rustc --version)" = "$(rustup run "$demo_msrv" rustc --version 2>/dev/null)" ]; then demo_target="$CARGO_TARGET_DIR"; fi
check "cargo +$demo_msrv check edgetune-demo" env CARGO_TARGET_DIR="$demo_target" \
  cargo "+$demo_msrv" check --locked --all-targets -p edgetune-demo
# The Python package's tests, against the wheel as a user installs it: scripts/wheel.sh builds
# it as it is published (`pip wheel`, setuptools-rust compiling the C library into it, then
# `auditwheel repair`, which must find it within a manylinux policy and tag it so), a venv kept
# outside the clone installs it, and the tests run from a scratch folder with no EDGETUNE_LIB,
# so `import edgetune` and its library come from the installed wheel alone.
repo="$PWD"
venv="$HOME/.cache/edgetune/py-test-venv-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
{
  bash "$(dirname "$0")/wheel.sh" "$wheels" &&
    "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheels"/edgetune-*.whl &&
    (cd "$wheels" && env -u EDGETUNE_LIB EDGETUNE_TEST_INSTALLED=1 "$venv/bin/python" -m unittest discover -v \
      -s "$repo/bindings/python/tests" -t "$repo/bindings/python/tests")
} 2>&1 | tee "$pylog" || status=1
lap "python"
py_ran=$({ grep -Eo '^Ran [0-9]+ tests?' "$pylog" || true; } | awk '{print $2}')
py_failed=$({ grep -Eo '(failures|errors)=[0-9]+' "$pylog" || true; } | cut -d= -f2 | awk '{s += $1} END {print s + 0}')
if [ -z "$py_ran" ]; then py_ran=0; py_failed=$((py_failed + 1)); status=1; fi
passed=$((passed + py_ran - py_failed))
failed=$((failed + py_failed))
# Every parser that reads outside input, fuzzed briefly (scripts/fuzz.sh; long runs are that
# script with more seconds): each target that runs its time without a crash counts as a test.
bash "$(dirname "$0")/fuzz.sh" "${FUZZ_SECONDS:-15}" 2>&1 | tee "$fuzzlog" || status=1
lap "fuzz"
fuzz_ok=$({ grep -Ec '^[a-z_]+: [0-9]+ executions, no crash$' "$fuzzlog" || true; })
fuzz_bad=$({ grep -Ec '^[a-z_]+: FAILED' "$fuzzlog" || true; })
if [ "$fuzz_ok" -eq 0 ] && [ "$fuzz_bad" -eq 0 ]; then fuzz_bad=1; status=1; fi
passed=$((passed + fuzz_ok))
failed=$((failed + fuzz_bad))
# The valgrind cycle started after the build: its libtest output, counted as cargo's is. A run
# that printed no result (it was never started, or died) counts as a failure.
if [ -n "$vgpid" ]; then
  wait "$vgpid" || status=1
  vgpid=""
else
  status=1
fi
lap "valgrind cycle (its wait after the rest)"
cat "$vglog"
vg_passed=$(libtest_passed "$vglog")
vg_failed=$(libtest_failed "$vglog")
if [ "$vg_passed" -eq 0 ] && [ "$vg_failed" -eq 0 ]; then vg_failed=1; status=1; fi
passed=$((passed + vg_passed))
failed=$((failed + vg_failed))
# Every kernel but the cooperative-matrix ones (which need a GPU's matrix units; their emulated
# twins run instead) was dispatched by some test above: a kernel added without a test, or a
# test that stopped reaching one, fails here by name.
check "every kernel lavapipe can run was dispatched" cargo run --locked --quiet -p edgetune-tests --bin kernel-coverage -- "$kernellog"
echo
echo "summary: $passed passed, $failed failed"
exit "$status"
