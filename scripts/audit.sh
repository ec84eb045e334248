#!/usr/bin/env bash
# Dependency audit with cargo-deny and the committed deny.toml: licenses, bans (wildcards,
# duplicates as warnings) and sources always; RustSec advisories when the advisory
# database (a GitHub repository) can be fetched — on a machine that cannot reach GitHub the
# advisory check is skipped with a clear notice, not silently passed. Before that, a
# self-check proves the advisory check can fail: against a stand-in database holding one
# advisory for a crate we depend on (served by `git daemon` on loopback), it must.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
DENY_VERSION=0.20.2
export PATH="$TOOLS/bin:$PATH"
if ! cargo-deny --version 2>/dev/null | grep -q " $DENY_VERSION\$"; then
    echo "installing cargo-deny $DENY_VERSION into $TOOLS (a few minutes, once)" >&2
    # A tool, not the product: built for a short build (no LTO, many codegen units,
    # light optimisation) rather than for speed — it runs for seconds.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
        cargo install -q cargo-deny --version "=$DENY_VERSION" --locked --root "$TOOLS" --force
fi

cargo deny --log-level error check licenses bans sources

# Self-check of the advisory check, offline.
work="$(mktemp -d)"
daemon=""
trap '[ -n "$daemon" ] && kill "$daemon" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/db/crates/fastrand"
cat > "$work/db/crates/fastrand/RUSTSEC-2099-0001.md" <<'ADVISORY'
```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "fastrand"
date = "2099-01-01"
title = "Stand-in advisory for the audit's self-check"
description = "Every version affected; never published."

[versions]
patched = []
```

# Stand-in advisory for the audit's self-check
ADVISORY
git -C "$work/db" init -q -b main
git -C "$work/db" add -A
git -C "$work/db" -c user.name=audit -c user.email=audit@localhost commit -qm "stand-in advisory"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
git daemon --base-path="$work" --export-all --reuseaddr --listen=127.0.0.1 --port="$port" "$work/db" 2>/dev/null &
daemon=$!
sed "s|^\[advisories\]|[advisories]\ndb-urls = [\"git://localhost:$port/db\"]\ndb-path = \"$work/cache\"|" deny.toml > "$work/deny.toml"
for _ in $(seq 1 50); do
    cargo deny --log-level error --config "$work/deny.toml" fetch db >/dev/null 2>&1 && break
    sleep 0.1
done
if out="$(cargo deny --log-level error --config "$work/deny.toml" --offline check advisories 2>&1)"; then
    echo "audit self-check FAILED: a dependency with an advisory passed the advisory check" >&2
    exit 1
fi
if ! grep -q "RUSTSEC-2099-0001" <<<"$out"; then
    echo "audit self-check FAILED: the advisory check failed for another reason:" >&2
    echo "$out" >&2
    exit 1
fi
echo "audit self-check ok: a dependency with an advisory fails the advisory check"

if timeout 120 cargo deny --log-level error fetch db >/dev/null 2>&1; then
    cargo deny --log-level error --offline check advisories
else
    echo "audit: SKIPPED the RustSec advisory check: its database (github.com/RustSec/advisory-db) cannot be fetched from this machine" >&2
fi
