#!/usr/bin/env bash
# Installs the system packages the project needs (PostgreSQL server binaries, Redis, wrk,
# openssl, Chromium and ChromeDriver),
# only when missing. Safe to run again.
set -euo pipefail

need=()
pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
[ -n "$(pg_bindir)" ] && [ -x "$(pg_bindir)/initdb" ] || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v wrk >/dev/null || need+=(wrk)
# Makes the P-256 key the schema fuzzing's stand-in for GitHub's keys endpoint serves.
command -v openssl >/dev/null || need+=(openssl)
# The console's browser tests drive Debian's headless Chromium through ChromeDriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)

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
