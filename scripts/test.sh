#!/usr/bin/env bash
# Runs every test. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
