# Sourced by run.sh and test.sh: installs what is missing (setup.sh) and sets the environment
# both use.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgetune/target}"
bash scripts/bound-cache.sh "$CARGO_TARGET_DIR"
# Mesa's Vulkan loader probes window-system sockets under XDG_RUNTIME_DIR and complains on
# headless machines when it is unset; give it a private empty one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
