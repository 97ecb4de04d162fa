#!/usr/bin/env bash
# Runs every test of stillpoint, including those that boot real VMs (what CI runs).
# Sets everything up first on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# Builds that outlive a clone: the test guest (kernel, initramfs and disks built from Debian
# packages) is cached per user, so a fresh clone (CI) does not download and build it again. A
# CI run also keeps cargo's build directory there, so only the workspace's own crates rebuild.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/stillpoint"
export STILLPOINT_GUEST_DIR="${STILLPOINT_GUEST_DIR:-$cache/guest}"
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$cache/ci-target"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Download and build the test guest once, up front, so a missing package fails here clearly
# instead of in every VM test.
cargo run --quiet -p stillpoint-cli -- vm build-guest
# nextest does not run doctests: the examples in the API docs run here.
cargo test --workspace --all-features --doc
cargo nextest run --workspace --all-features --no-fail-fast "$@"
