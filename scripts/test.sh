#!/usr/bin/env bash
# Runs every test: unit tests, then the end-to-end suites against the real binaries —
# the control plane with throwaway PostgreSQL and Redis, and the edge Worker under real
# `wrangler dev`. Installs what it needs first (cached outside the repo after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# Dependency audit (licenses, bans, sources; advisories when their database is reachable).
./scripts/audit.sh
# No module cycle in any crate (cargo-modules; ARCHITECTURE.md states the rule).
./scripts/check-modules.sh metlo-control-plane metlo-shared metlo-edge
./scripts/build-worker.sh
# The Worker deploys as documented (dry run of the production environment).
./scripts/deploy-check.sh
cargo build --locked -p metlo-control-plane
./scripts/stack.sh cargo test --locked --workspace -- "$@"
# Schema fuzzing of the control plane's OpenAPI document (bounded).
./scripts/schemathesis.sh
# Fuzzing smoke: every parser target briefly (`make fuzz` runs them longer).
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" ./scripts/fuzz.sh
