#!/usr/bin/env bash
# Schema fuzzing: schemathesis against the control plane's own /openapi.json, with a
# valid key: no 5xx, every response matches the schema. Bounded by MAX_EXAMPLES (default 50
# per operation). Installs schemathesis into a virtualenv cached outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}/venv"
if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q schemathesis
fi
cargo build --locked -q -p metlo-control-plane
bin="$PWD/target/debug/metlo-control-plane"
data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export DATA_DIR="$data" MAX_API_KEYS=1000000
key="$("$bin" keys create --name schemathesis 2>/dev/null)"
"$bin" serve --listen-addr "127.0.0.1:$port" 2>"$data/server.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.1; done
# No stateful phase: it chains list → roll/delete and would roll or delete the very key it
# authenticates with (any key may manage any key, as in Metlo), failing everything after.
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" -H "Authorization: $key" \
    --checks all --max-examples "${MAX_EXAMPLES:-50}" --seed 1 \
    --phases examples,coverage,fuzzing
if grep -q "$key" "$data/server.log"; then echo "the key appears in the server log" >&2; exit 1; fi
