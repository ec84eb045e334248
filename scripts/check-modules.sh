#!/usr/bin/env bash
# Checks that the control plane's modules form no cycle: cargo-modules (rust-analyzer's
# name resolution) lists which module uses which; a module-level graph must be acyclic.
# (cargo-modules' own --acyclic also counts a type and its methods as a cycle, so the
# graph is reduced to modules first and the cycle search is done here.) Installs
# cargo-modules once into the tools cache. Prints the cycles and exits 1 if there are any.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
version=0.27.0   # 0.28 needs Rust 1.98
if ! "$TOOLS/bin/cargo-modules" --version 2>/dev/null | grep -q " $version\$"; then
    echo "installing cargo-modules $version into $TOOLS (a few minutes, once)" >&2
    # A tool, not the product: built for a short build (no LTO, many codegen units,
    # light optimisation) rather than for speed — it runs for seconds.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
        cargo install -q cargo-modules --version "=$version" --locked --root "$TOOLS" --force
fi
for crate in "${@:-metlo-control-plane}"; do
    PATH="$TOOLS/bin:$PATH" cargo modules dependencies -p "$crate" --lib --cfg-test \
        --no-externs --no-sysroot --no-fns --no-traits --no-types --no-owns 2>/dev/null \
        | python3 -c '
import re, sys
crate = sys.argv[1]
edges = {}
for a, b in re.findall(r"^\s*\"([^\"]+)\" -> \"([^\"]+)\"", sys.stdin.read(), re.M):
    if a != b:
        edges.setdefault(a, set()).add(b)
# Tarjan: every strongly connected component of more than one module is a cycle.
index, low, stack, on, sccs = {}, {}, [], set(), []
def visit(v):
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        scc = []
        while True:
            w = stack.pop(); on.discard(w); scc.append(w)
            if w == v: break
        if len(scc) > 1: sccs.append(sorted(scc))
sys.setrecursionlimit(10000)
for v in list(edges):
    if v not in index: visit(v)
modules = {m for e in edges.items() for m in (e[0], *e[1])}
if not modules:
    sys.exit(f"{crate}: cargo-modules printed no graph")
for scc in sccs:
    print(f"{crate}: module cycle: " + " <-> ".join(scc))
    for a in scc:
        for b in sorted(edges.get(a, ()) & set(scc)):
            print(f"    {a} uses {b}")
if sccs: sys.exit(1)
print(f"{crate}: {len(modules)} modules, {sum(map(len, edges.values()))} use edges, no cycle")
' "$crate"
done
