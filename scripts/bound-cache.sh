#!/usr/bin/env bash
# Keeps a build folder kept between runs from filling the disk: cargo never deletes what it
# built before (test binaries of every past commit, incremental caches), so a cache reused run
# after run grows without end. Past LIMIT GiB (EDGETUNE_CACHE_LIMIT_GB, default 20) this drops
# the incremental caches, and empties the folder if that is not enough; the next build then
# starts cold, which costs minutes, not the run (about twenty on two cores for the test
# command's folder). The default leaves room for what one run of the test command keeps there
# (11 GiB: the test builds, and each published crate's unit-test build with its own features),
# so that the folder is emptied only once stale builds have piled up, not every other run.
#
#   scripts/bound-cache.sh FOLDER [LIMIT_GB]
set -euo pipefail
dir="$1"
limit_gb="${2:-${EDGETUNE_CACHE_LIMIT_GB:-20}}"
[ -d "$dir" ] || exit 0
limit_kb=$((limit_gb * 1024 * 1024))
size_kb() { du -sk "$dir" 2>/dev/null | cut -f1; }
used=$(size_kb)
[ "$used" -le "$limit_kb" ] && exit 0
echo "bound-cache: $dir holds $((used / 1024 / 1024)) GiB, over $limit_gb GiB: dropping incremental caches" >&2
find "$dir" -maxdepth 3 -type d -name incremental -prune -exec rm -rf {} +
used=$(size_kb)
[ "$used" -le "$limit_kb" ] && exit 0
echo "bound-cache: still $((used / 1024 / 1024)) GiB: emptying $dir" >&2
rm -rf "$dir"
