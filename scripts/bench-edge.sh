#!/usr/bin/env bash
# Edge benchmark (figures, not pass/fail): our Worker vs JavaScript baselines under
# workerd, a bare axum origin, wrk as the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-worker.sh
./scripts/build-worker.sh tests/bench/edge/rust-baseline
cargo build --locked --release -q -p metlo-control-plane -p metlo-tests --bins

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target/release/bare-axum "127.0.0.1:$port" 2>/dev/null &
origin=$!
data="$(mktemp -d)"
trap 'kill $origin 2>/dev/null; rm -rf "$data"' EXIT
# A real key, made the way an operator makes one.
key="$(target/release/metlo-control-plane --data-dir "$data" keys create --name bench 2>/dev/null)"
ORIGIN_URL="http://127.0.0.1:$port" METLO_KEY="$key" node tests/bench/edge/run.mjs
