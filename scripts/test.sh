#!/usr/bin/env bash
# Runs every test of stillpoint, including those that boot real VMs (what CI runs).
# Sets everything up first on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Download and build the test guest once, up front, so a missing package fails here clearly
# instead of in every VM test.
cargo run --quiet -p stillpoint-cli -- vm build-guest
cargo nextest run --workspace --all-features --no-fail-fast "$@"
