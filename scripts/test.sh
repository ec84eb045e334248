#!/usr/bin/env bash
# Runs every test: unit tests, then the end-to-end suite against the real binaries with
# throwaway PostgreSQL and Redis. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --locked -p metlo-control-plane
./scripts/stack.sh cargo test --locked --workspace -- "$@"
