#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): release builds, wrk as the load generator, a
# throwaway PostgreSQL with fsync on.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --locked --release -p metlo-control-plane -p metlo-tests --bins
export METLO_CONTROL_PLANE_BIN="$PWD/target/release/metlo-control-plane"
PG_FSYNC=on ./scripts/stack.sh target/release/bench
