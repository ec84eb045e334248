#!/usr/bin/env bash
# Schema fuzzing: schemathesis against the control plane's own /openapi.json, each
# operation with a key of the role it is for: no 5xx, every response matches the schema;
# then a client key on every management operation must get 403. Bounded by MAX_EXAMPLES (default 50
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
# The run checks the schema, not the failed-authentication budget (its negative-auth
# cases would spend it and turn later answers into 429s).
export DATA_DIR="$data" MAX_API_KEYS=1000000 AUTH_FAILURES_PER_MINUTE=0
admin="$("$bin" keys create --name st-admin --role admin 2>/dev/null)"
roller="$("$bin" keys create --name st-roller --role admin 2>/dev/null)"
patcher="$("$bin" keys create --name st-patcher --role admin 2>/dev/null)"
edge="$("$bin" keys create --name st-edge --role edge 2>/dev/null)"
client="$("$bin" keys create --name st-client --role client 2>/dev/null)"
# GitHub's secret-scanning keys, from a local stand-in serving a P-256 key made now: leak
# reports are then answered for what they are (400, 401), never 503 for want of GitHub.
mkdir -p "$data/gh/meta/public_keys"
openssl ecparam -name prime256v1 -genkey -noout -out "$data/gh.key" 2>/dev/null
python3 - "$data" <<'PY'
import json, subprocess, sys
data = sys.argv[1]
pem = subprocess.run(["openssl", "ec", "-in", f"{data}/gh.key", "-pubout"], capture_output=True, text=True, check=True).stdout
json.dump({"public_keys": [{"key_identifier": "st", "key": pem, "is_current": True}]},
          open(f"{data}/gh/meta/public_keys/secret_scanning", "w"))
PY
gh_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
python3 -m http.server "$gh_port" --bind 127.0.0.1 --directory "$data/gh" >/dev/null 2>&1 &
gh=$!
export GITHUB_KEYS_URL="http://127.0.0.1:$gh_port/meta/public_keys/secret_scanning"
"$bin" serve --listen-addr "127.0.0.1:$port" --ops-listen-addr 127.0.0.1:0 2>"$data/server.log" &
server=$!
trap 'kill $server $gh 2>/dev/null; rm -rf "$data"' EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 1 100); do curl -s -o /dev/null "$base/healthz" && break; sleep 0.1; done
# Each operation with the role it is for: admin routes with an admin key, the Worker's
# with the edge key, verify with a client key. Roll and delete (and updates, below) run
# apart, with an admin key of their own: schemathesis reuses names it has seen in responses (a list holds the
# names of its own keys) and would roll or delete the very key it authenticates with.
# For the same reason, no stateful phase.
st() { # key, filters…
    local key="$1"; shift
    "$venv/bin/st" run "$base/openapi.json" -H "Authorization: $key" \
        --checks all --max-examples "${MAX_EXAMPLES:-50}" --seed 1 \
        --phases examples,coverage,fuzzing "$@"
}
edge_paths='^/api/v1/(usage|revocations|keys/by-hash/.*)$'
destructive='/(roll|delete)$'
st "$admin" --exclude-path-regex "$edge_paths|^/api/v1/verify$|$destructive" --exclude-method PATCH
st "$roller" --include-path-regex "$destructive"
# Updates run alone too: with no list among its operations, that run never learns a real
# key's name, so it cannot disable the key it authenticates with.
st "$patcher" --include-method PATCH
st "$edge" --include-path-regex "$edge_paths"
st "$client" --include-path-regex '^/api/v1/verify$'
# A client key on every other /api/v1 operation of the document: 403, nothing else.
python3 - "$base" "$client" <<'PY'
import json, sys, urllib.request, urllib.error
base, key = sys.argv[1], sys.argv[2]
doc = json.load(urllib.request.urlopen(base + "/openapi.json"))
checked = 0
for path, item in doc["paths"].items():
    for method, op in item.items():
        # verify is the client's; a leak report carries GitHub's signature, not a key.
        if not path.startswith("/api/v1/") or path in ("/api/v1/verify", "/api/v1/leaks/github"):
            continue
        url = base + path.replace("{name}", "st-admin").replace("{hash}", "0" * 64)
        body = b"{}" if method in ("post", "put") else None
        req = urllib.request.Request(url, data=body, method=method.upper(),
                                     headers={"Authorization": key, "Content-Type": "application/json"})
        try:
            status = urllib.request.urlopen(req).status
        except urllib.error.HTTPError as e:
            status = e.code
        if status != 403:
            sys.exit(f"client key on {method.upper()} {path}: {status}, expected 403")
        checked += 1
print(f"client key: 403 on all {checked} other /api/v1 operations")
PY
for key in "$admin" "$roller" "$edge" "$client"; do
    if grep -q "$key" "$data/server.log"; then echo "a key appears in the server log" >&2; exit 1; fi
done
