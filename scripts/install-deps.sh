#!/usr/bin/env bash
# Installs the system packages the tests and benchmarks need (PostgreSQL server binaries,
# Redis, wrk, openssl, Chromium and ChromeDriver, tmux), only when missing. Safe to run again.
# `--only PKG…` installs just those (`make test-fast` needs only postgresql; `make dev`
# needs none of them).
set -euo pipefail

only=()
if [ "${1:-}" = "--only" ]; then shift; only=("$@"); fi
wanted() { [ ${#only[@]} -eq 0 ] || [[ " ${only[*]} " == *" $1 "* ]]; }

need=()
pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
wanted postgresql && { [ -n "$(pg_bindir)" ] && [ -x "$(pg_bindir)/initdb" ] || need+=(postgresql); }
wanted redis-server && { command -v redis-server >/dev/null || need+=(redis-server); }
wanted wrk && { command -v wrk >/dev/null || need+=(wrk); }
# Makes the P-256 key the schema fuzzing's stand-in for GitHub's keys endpoint serves.
wanted openssl && { command -v openssl >/dev/null || need+=(openssl); }
# The console's browser tests drive Debian's headless Chromium through ChromeDriver.
wanted chromium && { command -v chromium >/dev/null || need+=(chromium); }
wanted chromium-driver && { command -v chromedriver >/dev/null || need+=(chromium-driver); }
# `make dev`'s own test types Ctrl-C into a real terminal: a tmux session.
wanted tmux && { command -v tmux >/dev/null || need+=(tmux); }

if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # Don't let the packages start system-wide services: our scripts run throwaway ones.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; then
        $SUDO apt-get update -q >/dev/null
        $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
    $SUDO rm -f /usr/sbin/policy-rc.d
fi
