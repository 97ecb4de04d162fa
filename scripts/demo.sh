#!/usr/bin/env bash
# Runs stillpoint's main job on its embedded default: the demo VM and a local repository.
# Sets everything up first on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo run --release --quiet -p stillpoint-cli -- vm build-guest
cargo run --release --quiet -p stillpoint-cli -- demo "$@"
