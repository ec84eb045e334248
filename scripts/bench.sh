#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): release builds, wrk as the load generator, a
# throwaway PostgreSQL with fsync on.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --locked --release -p metlo-control-plane -p metlo-tests --bins
export METLO_CONTROL_PLANE_BIN="$PWD/target/release/metlo-control-plane"
# BENCH_BASELINE=<git revision> (e.g. HEAD~1): also measure that revision's control plane,
# interleaved with this one (built in its own target dir, so this build stays warm).
if [ -n "${BENCH_BASELINE:-}" ]; then
    tree="$(mktemp -d)"
    git worktree add --detach -q "$tree" "$BENCH_BASELINE"
    CARGO_TARGET_DIR="$PWD/target/baseline" cargo build --locked --release -q \
        --manifest-path "$tree/Cargo.toml" -p metlo-control-plane
    git worktree remove --force "$tree"
    export METLO_BASELINE_BIN="$PWD/target/baseline/release/metlo-control-plane"
    echo "baseline: $BENCH_BASELINE ($(git rev-parse --short "$BENCH_BASELINE"))"
fi
PG_FSYNC=on ./scripts/stack.sh target/release/bench
# A flood of checksum-valid made-up keys beside a valid key's steady calls (PostgreSQL).
PG_FSYNC=on ./scripts/stack.sh target/release/flood
# Scale: 1,000 vs 1,000,000 keys on PostgreSQL (seeded with `keys seed`).
PG_FSYNC=on ./scripts/stack.sh target/release/scale
# The revocation feed read by 300 simulated edge locations, once a second each.
PG_FSYNC=on ./scripts/stack.sh target/release/feed-load
