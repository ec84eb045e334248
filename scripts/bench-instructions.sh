#!/usr/bin/env bash
# Instructions per authenticated verification (callgrind: counts, not seconds, so a busy
# machine does not move them much), this build against BENCH_BASELINE's (a git revision,
# default HEAD~1), measured in one run: each binary serves 500 and then 4,500
# keep-alive `GET /api/v1/verify`s under valgrind, and the difference / 4,000 is the cost
# of one. Prints both and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "bench-instructions: SKIPPED — valgrind not installed" >&2; exit 0; }
rev="${BENCH_BASELINE:-HEAD~1}"
cargo build --locked --release -q -p metlo-control-plane
tree="$(mktemp -d)"
git worktree add --detach -q "$tree" "$rev"
CARGO_TARGET_DIR="$PWD/target/baseline" cargo build --locked --release -q \
    --manifest-path "$tree/Cargo.toml" -p metlo-control-plane
git worktree remove --force "$tree"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
count() { # binary requests → instructions the server executed in all
    local bin="$1" n="$2" d key role=()
    d="$(mktemp -d)"
    "$bin" keys create --help | grep -q -- --role && role=(--role client)
    key="$(DATA_DIR="$d" "$bin" keys create --name bench "${role[@]}" 2>/dev/null)"
    DATA_DIR="$d" OPS_LISTEN_ADDR=127.0.0.1:0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$bin" serve --listen-addr "127.0.0.1:$port" >"$d/log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do curl -s -o /dev/null "127.0.0.1:$port/healthz" && break; sleep 0.2; done
    python3 - "$port" "$key" "$n" <<'PY'
import http.client, sys
port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", "/api/v1/verify", headers={"Authorization": key})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
    kill -TERM "$pid"; wait "$pid" || true
    awk '/Collected/ {print $4}' "$d/log"
    rm -rf "$d"
}
per_request() { # binary
    local few many
    few="$(count "$1" 500)"; many="$(count "$1" 4500)"
    echo $(( (many - few) / 4000 ))
}
base="$(per_request target/baseline/release/metlo-control-plane)"
this="$(per_request target/release/metlo-control-plane)"
python3 -c "print(f'instructions per verification: baseline {\"$rev\"} $base, this build $this, ratio {$this/$base:.3f}')"
