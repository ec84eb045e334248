#!/usr/bin/env bash
# Throwaway PostgreSQL for tests and benchmarks.
#   scripts/stack.sh <command…>   starts PostgreSQL on a free port, exports
#                                 METLO_TEST_PG_URL, runs the command, stops PostgreSQL.
# PG_FSYNC=off (the default for tests) trades durability for speed; benchmarks set it on.
set -euo pipefail
cd "$(dirname "$0")/.."

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$bindir/initdb" ] || { echo "PostgreSQL not found: run scripts/install-deps.sh" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# PostgreSQL refuses to run as root: use the postgres user then.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

dir="$(mktemp -d /tmp/metlo-pg.XXXXXX)"
chmod 755 "$dir"
[ "$(id -u)" -eq 0 ] && chown postgres "$dir"
port="$(free_port)"

stop() {
    as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap stop EXIT

as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=1000 -c fsync=${PG_FSYNC:-off} -c shared_buffers=128MB" >/dev/null

export METLO_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
echo "PostgreSQL on port $port (data in $dir)" >&2
"$@"
