#!/usr/bin/env bash
# Edge benchmark (figures, not pass/fail): our Worker vs JavaScript baselines under
# workerd, a bare axum origin, wrk as the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-worker.sh
./scripts/build-worker.sh tests/bench/edge/rust-baseline
cargo build --locked --release -q -p metlo-control-plane -p metlo-tests --bins

# EDGE_BASELINE=<git revision>: also build that revision's Worker and measure it
# interleaved with this one (the "before" of a change). Built in a worktree that shares
# this checkout's node_modules, with a wasm target dir of its own kept between runs
# (target-wasm-baseline/: sharing target-wasm/ would let one build's artifact stand in
# for the other's).
before_worker=""
if [ -n "${EDGE_BASELINE:-}" ]; then
    tree="$(mktemp -d)/before"
    git worktree add -q --detach "$tree" "$EDGE_BASELINE"
    ln -s "$PWD/node_modules" "$tree/node_modules"
    # Older than the installed packages: the worktree's build must not run `npm ci`, which
    # would empty the shared node_modules.
    touch -d @0 "$tree/package-lock.json"
    mkdir -p target-wasm-baseline
    ln -s "$PWD/target-wasm-baseline" "$tree/target-wasm"
    echo "building the Worker at $EDGE_BASELINE ($(git rev-parse --short "$EDGE_BASELINE"))" >&2
    (cd "$tree" && ./scripts/build-worker.sh >/dev/null)
    mkdir -p target/bench-edge-before
    cp -r "$tree/edge/build/." target/bench-edge-before/
    git worktree remove --force "$tree"
    before_worker="$PWD/target/bench-edge-before/index.js"
fi

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target/release/bare-axum "127.0.0.1:$port" 2>/dev/null &
origin=$!
data="$(mktemp -d)"
trap 'kill $origin 2>/dev/null; rm -rf "$data"' EXIT
# A real key, made the way an operator makes one.
key="$(target/release/metlo-control-plane --data-dir "$data" keys create --name bench 2>/dev/null)"
# And one with a rate limit it never reaches: what counting costs.
limited="$(target/release/metlo-control-plane --data-dir "$data" keys create --name bench-limited \
    --rate-limit 1000000000/60 2>/dev/null)"
# And one with credits it never spends: what metering costs.
metered="$(target/release/metlo-control-plane --data-dir "$data" keys create --name bench-metered \
    --credits 1000000000000 2>/dev/null)"
# The control plane itself, for the revocation feed the Worker reads (once a second per
# location: what that costs the edge, and what the control plane receives, are measured).
edge_key="$(target/release/metlo-control-plane --data-dir "$data" keys create --name bench-edge \
    --role edge 2>/dev/null)"
cp_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
ops_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target/release/metlo-control-plane --data-dir "$data" serve --listen-addr "127.0.0.1:$cp_port" \
    --ops-listen-addr "127.0.0.1:$ops_port" >"$data/control-plane.log" 2>&1 &
control_plane=$!
trap 'kill $origin $control_plane 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$ops_port/readyz" && break
    sleep 0.1
done
ORIGIN_URL="http://127.0.0.1:$port" METLO_KEY="$key" METLO_LIMITED_KEY="$limited" METLO_METERED_KEY="$metered" \
    CONTROL_PLANE_URL="http://127.0.0.1:$cp_port" CONTROL_PLANE_KEY="$edge_key" \
    CONTROL_PLANE_METRICS="http://127.0.0.1:$ops_port/metrics" \
    BEFORE_WORKER="$before_worker" node tests/bench/edge/run.mjs
