#!/usr/bin/env bash
# Soak test (a report, with a non-zero exit on any wrong decision): SOAK_SECONDS of mixed
# traffic through the whole stack (default 300). See tests/src/bin/soak.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-worker.sh
cargo build --locked -q -p metlo-control-plane -p metlo-tests --bins
./scripts/stack.sh target/debug/soak
