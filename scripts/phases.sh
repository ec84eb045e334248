# Sourced by the test scripts: `phase NAME COMMAND…` runs the command and records how
# long it took in $METLO_PHASES (a file, shared with scripts run inside this one), and
# `print_phases` prints them as a table. A failed command stops the run, its phase marked.
METLO_PHASES="${METLO_PHASES:-$(mktemp /tmp/metlo-phases.XXXXXX)}"
export METLO_PHASES

phase() {
    local name="$1"; shift
    local start=$SECONDS rc=0
    echo "==> $name" >&2
    "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)")" >>"$METLO_PHASES"
    return $rc
}

print_phases() {
    [ -s "$METLO_PHASES" ] || { rm -f "$METLO_PHASES"; return 0; }
    python3 - "$METLO_PHASES" <<'PY' >&2
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
total = sum(int(r[1]) for r in rows)
width = max(len(r[0]) for r in rows + [["total"]])
print(f"\n{'phase':<{width}}  {'time':>8}  result")
for name, secs, result in rows:
    s = int(secs)
    print(f"{name:<{width}}  {s // 60:>4}m{s % 60:02}s  {result}")
print(f"{'total':<{width}}  {total // 60:>4}m{total % 60:02}s")
PY
    rm -f "$METLO_PHASES"
}
