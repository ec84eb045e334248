#!/usr/bin/env bash
# Fuzzes the parsers with cargo-fuzz (libFuzzer, nightly): key parsing, Authorization
# parsing, the KV-record decoder, and the control plane's create-body decoding. Each
# target runs FUZZ_SECONDS (default 60) from the committed seeds in
# fuzz/seeds/ plus a working corpus in fuzz/corpus/ (git-ignored). Prints executions and
# crashes per target; exits non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
if [ ! -x "$TOOLS/bin/cargo-fuzz" ]; then
    cargo install -q cargo-fuzz --locked --root "$TOOLS"
fi
seconds="${FUZZ_SECONDS:-60}"
export RUSTUP_TOOLCHAIN=nightly   # libFuzzer instrumentation needs -Z flags
if ! rustc --version >/dev/null 2>&1; then
    echo "fuzz: SKIPPED — no nightly Rust toolchain on this machine (cargo-fuzz needs one)" >&2
    exit 0
fi
# FUZZ_TARGETS: a space-separated subset (default: all).
read -r -a targets <<<"${FUZZ_TARGETS:-key_parse authorization kv_record create_request leak_report}"
"$TOOLS/bin/cargo-fuzz" build -O >&2
# Seeds with a well-formed key are made here, fresh, rather than committed: a committed
# string of a key's exact shape would set off secret scanners (ours included).
python3 - <<'PY'
import os, secrets, zlib
alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
body = "".join(secrets.choice(alphabet) for _ in range(36))
n, check = zlib.crc32(body.encode()), ""
for _ in range(6):
    n, r = divmod(n, 62)
    check = alphabet[r] + check
key = "metlo." + body + check
bad = key[:-1] + ("0" if key[-1] != "0" else "1")
for target, name, text in [("key_parse", "valid", key), ("key_parse", "bad-checksum", bad),
                           ("authorization", "bare", key), ("authorization", "bearer", "Bearer " + key)]:
    os.makedirs(f"fuzz/corpus/{target}", exist_ok=True)
    open(f"fuzz/corpus/{target}/seed-{name}", "w").write(text)
PY
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="$(mktemp)"
    if "$TOOLS/bin/cargo-fuzz" run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        crashes=0
    else
        crashes=1; status=1
        tail -40 "$log" >&2
    fi
    execs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')"
    rate="$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')"
    printf 'fuzz %-15s %12s execs in %ss (%s/s), crashes: %s\n' "$t" "$execs" "$seconds" "$rate" "$crashes"
    rm -f "$log"
done
exit $status
