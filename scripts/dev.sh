#!/usr/bin/env bash
# Runs the control plane locally on the embedded default (SQLite under ./data, in-process
# cache) unless DATABASE_URL / REDIS_URL are set. Prints a fresh admin key and a curl.
set -euo pipefail
cd "$(dirname "$0")/.."

export LISTEN_ADDR="${LISTEN_ADDR:-127.0.0.1:8080}"
cargo build --locked -q -p metlo-control-plane
bin=target/debug/metlo-control-plane

# A fresh admin key each run: the old one (if any) is deleted, since a key is shown only once.
"$bin" keys delete dev-admin >/dev/null 2>&1 || true
key="$("$bin" keys create --name dev-admin 2>/dev/null)"

cat <<MSG

  Control plane: http://$LISTEN_ADDR  (store: ${DATABASE_URL:+$DATABASE_URL}${DATABASE_URL:-SQLite in ${DATA_DIR:-./data}}, cache: ${REDIS_URL:+Redis}${REDIS_URL:-in-process})
  Admin key (shown once): $key

  Try:
    curl -s -H 'Authorization: $key' http://$LISTEN_ADDR/api/v1/keys/list
    curl -s -H 'Authorization: $key' -X POST http://$LISTEN_ADDR/api/v1/keys/create -d '{"name":"my-key","keyFor":"GENERIC"}'

  Ctrl-C stops it.

MSG
exec "$bin" serve
