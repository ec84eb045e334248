#!/usr/bin/env bash
# Inside scripts/stack.sh (METLO_TEST_PG_URL set): the unit and in-process tests, then
# each end-to-end suite of tests/tests/ as its own phase. With METLO_FAST=1, only the
# first (`make test-fast`). Arguments are passed to every test binary (a name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/phases.sh
phase "unit + in-process" cargo test --locked --workspace --lib --bins -- "$@"
phase "doc tests" cargo test --locked --workspace --doc -- "$@"
[ "${METLO_FAST:-}" = 1 ] && exit 0
for suite in tests/tests/*.rs; do
    name="$(basename "$suite" .rs)"
    phase "e2e: $name" cargo test --locked -p metlo-tests --test "$name" -- "$@"
done
