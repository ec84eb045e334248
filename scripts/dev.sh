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
# everything.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

./scripts/install-deps.sh
./scripts/build-worker.sh
cargo build --locked -q -p metlo-control-plane -p metlo-tests --bins
bin=target/debug/metlo-control-plane

export LISTEN_ADDR=127.0.0.1:8080 OPS_LISTEN_ADDR=127.0.0.1:9090
export KV_API_URL=http://127.0.0.1:8788/client/v4 CLOUDFLARE_ACCOUNT_ID=local \
       KV_NAMESPACE_ID=metlo-keys-local CLOUDFLARE_API_TOKEN=dev-token
export CI=true WRANGLER_SEND_METRICS=false CLOUDFLARE_CF_FETCH_ENABLED=false

pids=()
stop() {
    trap - INT TERM EXIT
    echo; echo "stopping…" >&2
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

wait_http() { # url
    for _ in $(seq 1 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "$1 did not come up" >&2; return 1
}

# Keys are shown once: make fresh ones each run (the old ones are deleted first).
fresh_key() { # name role
    "$bin" keys delete "$1" >/dev/null 2>&1 || true
    "$bin" keys create --name "$1" --role "$2" 2>/dev/null
}
admin_key="$(fresh_key dev-admin admin)"
worker_key="$(fresh_key dev-edge-worker edge)"
demo_key="$(fresh_key dev-demo client)"
printf 'CONTROL_PLANE_KEY = "%s"\n' "$worker_key" > .dev.vars   # git-ignored

setsid target/debug/demo-origin 8081 2>/dev/null & pids+=($!)
setsid npx wrangler dev -c dev/kv-api/wrangler.toml --local --ip 127.0.0.1 --port 8788 \
    --inspector-port 9230 --persist-to .wrangler/state --show-interactive-dev-session=false \
    >.wrangler-kv-api.log 2>&1 & pids+=($!)
setsid "$bin" serve & pids+=($!)
setsid npx wrangler dev --local --ip 127.0.0.1 --port 8787 --inspector-port 9229 \
    --persist-to .wrangler/state --show-interactive-dev-session=false >.wrangler-edge.log 2>&1 & pids+=($!)

wait_http http://127.0.0.1:8080/healthz
wait_http http://127.0.0.1:8788/__stats
wait_http http://127.0.0.1:8787/
for _ in $(seq 1 100); do   # the keys made above reach KV through the outbox
    curl -s http://127.0.0.1:9090/readyz | grep -q '"outboxDepth":0' && break; sleep 0.1
done

cat <<MSG

  Everything is up (logs: control plane below, wrangler in .wrangler-*.log).

  Keys (each shown once):
    admin   (manages keys, reads the audit log; refused at the edge): $admin_key
    client  (demo traffic through the edge, /api/v1/verify):          $demo_key
    edge    (the Worker's own key, in .dev.vars; refused at the edge): dev-edge-worker

  Through the edge (the Worker checks the key, then proxies to the demo origin):
    curl -s -H 'Authorization: $demo_key' http://127.0.0.1:8787/hello?x=1
    curl -s -i http://127.0.0.1:8787/hello                                  # 401

  The control plane's API (admin key; the demo key gets 403 here):
    curl -s -H 'Authorization: $admin_key' http://127.0.0.1:8080/api/v1/keys/list
    curl -s http://127.0.0.1:9090/readyz                                     # ops port
    curl -s -H 'Authorization: $admin_key' -X DELETE http://127.0.0.1:8080/api/v1/keys/dev-demo/delete
      (then the edge refuses the demo key within a second)

  Ctrl-C stops everything.

MSG
wait
