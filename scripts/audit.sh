#!/usr/bin/env bash
# Dependency audit with cargo-deny and the committed deny.toml: licenses, bans (wildcards,
# duplicates as warnings) and sources always; RustSec advisories when the advisory
# database (a GitHub repository) can be fetched — on a machine that cannot reach GitHub the
# advisory check is skipped with a clear notice, not silently passed.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
DENY_VERSION=0.20.2
export PATH="$TOOLS/bin:$PATH"
if ! cargo-deny --version 2>/dev/null | grep -q " $DENY_VERSION\$"; then
    echo "installing cargo-deny $DENY_VERSION into $TOOLS (a few minutes, once)" >&2
    cargo install -q cargo-deny --version "=$DENY_VERSION" --locked --root "$TOOLS" --force
fi

cargo deny --log-level error check licenses bans sources

if timeout 120 cargo deny --log-level error fetch db >/dev/null 2>&1; then
    cargo deny --log-level error --offline check advisories
else
    echo "audit: SKIPPED the RustSec advisory check: its database (github.com/RustSec/advisory-db) cannot be fetched from this machine" >&2
fi
