#!/usr/bin/env bash
# Checks that each crate's modules form no cycle (ARCHITECTURE.md states the rule): reads
# the sources (`scripts/check-modules.py`; seconds, nothing to install), prints the
# cycles with the uses that make them, and exits 1 if there are any. Arguments: crate
# directories (default: the three with a library).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- control-plane shared edge
exec python3 scripts/check-modules.py "$@"
