#!/usr/bin/env bash
# Runs every test of stillpoint, including those that boot real VMs (what CI runs).
# Sets everything up first on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo nextest run --workspace --all-features --no-fail-fast "$@"
