#!/usr/bin/env bash
# Runs the whole system locally with one command, no Cloudflare account:
#   control plane  http://127.0.0.1:8080  (SQLite in ./data and an in-process cache, unless
#                                          DATABASE_URL / REDIS_URL are set)
#   edge Worker    http://127.0.0.1:8787  (wrangler dev: real workerd, local KV)
#   demo origin    http://127.0.0.1:8081  (echoes what reaches it)
#   KV API         http://127.0.0.1:8788  (local stand-in for Cloudflare's KV REST API; the
#                                          control plane's KV sync pushes to it, and it writes
#                                          the local KV the edge reads)
# Makes an admin key (manages keys), an edge key (the Worker's own credential) and a
# client demo key (traffic), and prints a curl through the edge that works. Ctrl-C stops
# everything. Ports: DEV_CONTROL_PLANE_PORT (8080), DEV_OPS_PORT (9090), DEV_EDGE_PORT
# (8787), DEV_KV_API_PORT (8788), DEV_ORIGIN_PORT (8081), DEV_EDGE_INSPECTOR_PORT (9229),
# DEV_KV_INSPECTOR_PORT (9230); local KV state in DEV_STATE_DIR (.wrangler/state).
set -euo pipefail
cd "$(dirname "$0")/.."

# None of the tests' system packages (Chromium and the rest are `make test`'s): SQLite is
# built in, and PostgreSQL / Redis are the user's own when DATABASE_URL / REDIS_URL name
# them. (Without a rustup wasm32 target, build-worker.sh installs Debian's rustc-web.)
./scripts/build-worker.sh
cargo build --locked -q -p metlo-control-plane -p metlo-tests --bins

# Starting, supervising and stopping is a Rust program (tests/src/bin/dev.rs): it checks
# the ports first, waits on its own children, and stops every process group whatever the
# signal or plumbing (Ctrl-C, SIGTERM, SIGHUP, `| tee`, `| head`, a child dying).
exec target/debug/dev
