#!/usr/bin/env bash
# Opens the demo app: installs what is missing and fetches the default model (setup.sh), which
# the app then offers, and builds and starts the window. Needs a desktop session (X11 or
# Wayland) and a Vulkan, Metal or DX12 driver; without a GPU, Mesa's lavapipe works.
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec cargo run --release --locked -p edgetune-demo
