#!/usr/bin/env bash
# Runs every test: unit and in-process tests, then the end-to-end suites against the real
# binaries — the control plane with throwaway PostgreSQL and Redis, the edge Worker under
# real `wrangler dev`, the console in Chromium — and schema fuzzing. Installs what it
# needs first (cached outside the repo after the first run). Prints how long each phase
# took at the end. Arguments are passed to every test binary (a name filter).
# Not here: coverage-guided fuzzing (`make fuzz`; see README, Contributing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/phases.sh
# No incremental state: a fresh build never reuses it, and it is a quarter of target/.
export CARGO_INCREMENTAL=0
trap print_phases EXIT

phase "install (system packages, Worker tools)" \
    bash -c './scripts/install-deps.sh && ./scripts/install-edge-tools.sh && ./scripts/install-verifiers.sh >/dev/null'
# Dependency audit (licenses, bans, sources; advisories when their database is reachable).
phase "audit (cargo-deny)" ./scripts/audit.sh
# No module cycle in any crate (ARCHITECTURE.md states the rule).
phase "module check" ./scripts/check-modules.sh
# The Worker builds within its budget and deploys as documented (dry run).
phase "Worker build + deploy check" bash -c './scripts/build-worker.sh && ./scripts/deploy-check.sh'
phase "build (workspace, tests)" cargo build --locked --workspace --tests --bins
# One PostgreSQL for all the tests (each test makes its own database in it).
./scripts/stack.sh ./scripts/test-suites.sh "$@"
# Schema fuzzing of the control plane's OpenAPI document (bounded).
phase "schemathesis" ./scripts/schemathesis.sh
