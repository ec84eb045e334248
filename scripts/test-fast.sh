#!/usr/bin/env bash
# `make test-fast`: the unit and in-process tests only (every crate's own tests, the
# control plane's routes on SQLite and on a throwaway PostgreSQL), no end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/phases.sh
trap print_phases EXIT
./scripts/install-deps.sh --only postgresql
METLO_FAST=1 ./scripts/stack.sh ./scripts/test-suites.sh "$@"
