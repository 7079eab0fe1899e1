#!/usr/bin/env bash
# Installs what edgetune's commands and tests need on a fresh Debian/Ubuntu machine: a Vulkan
# loader and Mesa's drivers (lavapipe gives wgpu a CPU adapter where there is no GPU), and the
# default model (see fetch-model.sh), and the tools the tests use. Safe to run again.
set -euo pipefail
need=()
for p in libvulkan1 mesa-vulkan-drivers; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# Tools: a C compiler and valgrind for the C tests, python3 (with pip) for the model download
# and the Python package.
command -v cc >/dev/null || need+=(gcc libc6-dev)
# llama.cpp, the judge of the GGUF tests, builds from source (scripts/llama-cpp.sh).
command -v c++ >/dev/null || need+=(g++)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
command -v valgrind >/dev/null || need+=(valgrind)
# The C library's install step and the projects that use it (bindings/c/tests/install.rs).
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v readelf >/dev/null || need+=(binutils)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from rustup.rs" >&2; exit 1; }
# The toolchains of the minimum supported Rust versions (rust-version in Cargo.toml, and the
# demo's own in demo-app/Cargo.toml), which the test command checks the publishable crates with.
here="$(dirname "$0")/.."
for msrv in "$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$here/Cargo.toml")" \
  "$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$here/demo-app/Cargo.toml")"; do
  if command -v rustup >/dev/null && ! rustup run "$msrv" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$msrv" --profile minimal >/dev/null 2>&1 ||
      echo "setup.sh: could not install Rust $msrv; the test command's MSRV check will fail" >&2
  fi
done
bash "$(dirname "$0")/fetch-model.sh" >/dev/null
