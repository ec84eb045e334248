#!/usr/bin/env python3
"""Checks that a crate's modules form no cycle (ARCHITECTURE.md states the rule).

Reads the sources, not a compiler's view: from `src/lib.rs` it follows `mod` items (files
and inline blocks, every `cfg` included), and counts module A as using module B when
code in A names a path into B — `crate::…`, `super::…`, `self::…`, a child module, or a
name a `use` brought in (`use crate::db; … db::keys::insert(…)` uses `db::keys`). A glob
(`use super::*`) uses the module it names. What is not seen: paths built by macros.
A module that declares another (`mod x;`) does not use it by that.

Usage: check-modules.py [--edges] CRATE_DIR… — prints one line per crate, and every
cycle (the modules in it and which uses which); exits 1 if there is one. `--edges`
prints the use edges instead.
(It replaced cargo-modules, whose rust-analyzer build took 6.5 minutes of a fresh `make
test`'s 27 for a check of seconds.)
"""
import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(src):
    """The source with comments, strings and char literals blanked (offsets kept)."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a, b):
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(src, i)) and (
            i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")
        ):
            end = src.find('"' + m.group(1), m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            blank(i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'":
            if src.startswith("\\", i + 1):  # '\n', '\'', '\u{..}'
                j = src.find("'", i + 3 if src[i + 2] == "'" else i + 2)
                blank(i, j + 1)
                i = j + 1
            elif i + 2 < n and src[i + 2] == "'":  # 'a'
                blank(i, i + 3)
                i += 3
            else:  # a lifetime
                i += 1
        else:
            i += 1
    return "".join(out)


def matching_brace(text, open_at):
    depth = 0
    for k in range(open_at, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return len(text)


class Crate:
    def __init__(self, crate_dir):
        self.name = None
        self.exports = {}
        for line in open(os.path.join(crate_dir, "Cargo.toml")):
            if m := re.match(r'\s*name\s*=\s*"([^"]+)"', line):
                self.name = m.group(1).replace("-", "_")
                break
        self.modules = set()
        # (module, text, scopes): scopes are (start, end, module) of inline `mod` blocks.
        self.files = []
        self.load(os.path.join(crate_dir, "src", "lib.rs"), ())

    def load(self, path, module):
        self.modules.add(module)
        text = strip(open(path, encoding="utf-8").read())
        scopes = [(0, len(text), module)]
        stem = os.path.splitext(os.path.basename(path))[0]
        own_dir = (
            os.path.dirname(path)
            if stem in ("lib", "main", "mod")
            else os.path.join(os.path.dirname(path), stem)
        )
        for m in re.finditer(rf"\bmod\s+({IDENT})\s*([;{{])", text):
            outer = self.scope_at(scopes, m.start())
            child = outer + (m.group(1),)
            if m.group(2) == "{":
                end = matching_brace(text, m.end() - 1)
                scopes.append((m.end(), end, child))
                self.modules.add(child)
            else:
                base = os.path.join(own_dir, *outer[len(module):], m.group(1))
                for candidate in (base + ".rs", os.path.join(base, "mod.rs")):
                    if os.path.exists(candidate):
                        self.load(candidate, child)
                        break
                else:
                    sys.exit(f"{self.name}: no file for `mod {m.group(1)};` in {path}")
        self.files.append((module, text, scopes))

    @staticmethod
    def scope_at(scopes, pos):
        inner = None
        for start, end, module in scopes:
            if start <= pos < end and (inner is None or len(module) > len(inner)):
                inner = module
        return inner

    def resolve(self, module, segments, aliases):
        """The module a path (its `::` segments) leads into, seen from `module`, and
        whether the whole path names that module; None if it leads out of the crate."""
        first = segments[0]
        if first == "crate" or first == self.name:
            base, rest = (), segments[1:]
        elif first in ("super", "self"):
            base, rest = module, segments
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    base = base[:-1]
                rest = rest[1:]
        elif module + (first,) in self.modules:
            base, rest = module + (first,), segments[1:]
        elif first in aliases:
            base, rest = aliases[first], segments[1:]
        else:
            return None
        while rest and base + (rest[0],) in self.modules:
            base, rest = base + (rest[0],), rest[1:]
        # An item a module re-exports (`pub use child::Item`) is its defining module's.
        for _ in range(8):
            if not rest or rest[0] not in self.exports.get(base, {}):
                break
            base = self.exports[base][rest[0]]
            rest = rest[1:]
        return base, not rest

    def children(self, module):
        return [m for m in self.modules if len(m) == len(module) + 1 and m[:-1] == module]

    def read_exports(self):
        """What each module re-exports: name → the module the item comes from."""
        self.exports = {}
        for _, text, scopes in self.files:
            for m in re.finditer(r"\bpub(\s*\([^)]*\))?\s+use\s+([^;]*);", text):
                scope = self.scope_at(scopes, m.start())
                for path, binding in expand_use(m.group(2)):
                    resolved = self.resolve(scope, path[:-1], {}) if len(path) > 1 else None
                    if binding and resolved is not None and resolved[1]:
                        self.exports.setdefault(scope, {})[binding] = resolved[0]

    def edges(self):
        self.read_exports()
        found = {}
        use_re = re.compile(r"\buse\s+([^;]*);")
        path_re = re.compile(rf"(?<![A-Za-z0-9_:])((?:{IDENT}\s*::\s*)+(?:{IDENT})?)")
        for _, text, scopes in self.files:
            # Names `use` binds in each scope, to the module they name.
            aliases = {}
            for m in use_re.finditer(text):
                scope = self.scope_at(scopes, m.start())
                for path, binding in expand_use(m.group(1)):
                    resolved = self.resolve(scope, path, aliases.get(scope, {}))
                    if resolved is None:
                        continue
                    target, whole = resolved
                    self.add(found, scope, target)
                    names = aliases.setdefault(scope, {})
                    if binding is None:  # a glob: its modules are named here too
                        for child in self.children(target):
                            names.setdefault(child[-1], child)
                    elif whole:
                        names[binding] = target
            # Outside `use` items (read above), every path into the crate.
            code = use_re.sub(lambda m: " " * len(m.group(0)), text)
            for m in path_re.finditer(code):
                segments = [s.strip() for s in m.group(1).split("::") if s.strip()]
                scope = self.scope_at(scopes, m.start())
                resolved = self.resolve(scope, segments, aliases.get(scope, {}))
                if resolved is not None:
                    self.add(found, scope, resolved[0])
        return found

    @staticmethod
    def add(found, a, b):
        if a != b:
            found.setdefault(a, set()).add(b)


def expand_use(tree):
    """`a::{b, c::d as e, f::*, self}` → ([a, b], "b"), ([a, c, d], "e"), ([a, f], None),
    ([a], "a"): each path with the name it binds (None for a glob)."""
    tree = re.sub(r"\s+", " ", tree).strip()
    tree = re.sub(r"^pub(\s*\([^)]*\))?\s+", "", tree)
    results = []

    def leaf(prefix, part):
        binding = None
        if m := re.fullmatch(rf"(.*?)\s+as\s+({IDENT}|_)", part):
            part, binding = m.group(1), m.group(2)
        segments = [s.strip() for s in part.split("::") if s.strip()]
        if not segments:
            return
        if segments[-1] == "*":
            results.append((prefix + segments[:-1], None))
        elif segments[-1] == "self":
            path = prefix + segments[:-1]
            results.append((path, binding or (path[-1] if path else None)))
        else:
            results.append((prefix + segments, binding or segments[-1]))

    def walk(prefix, part):
        part = part.strip()
        if "{" not in part:
            leaf(prefix, part)
            return
        head, body = part.split("{", 1)
        head = [s.strip() for s in head.split("::") if s.strip()]
        inner = body[: body.rindex("}")]
        depth, start = 0, 0
        for k, ch in enumerate(inner + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                if inner[start:k].strip():
                    walk(prefix + head, inner[start:k])
                start = k + 1

    walk([], tree)
    return [(p, b) for p, b in results if p]


def cycles(edges):
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return sccs


def main():
    failed = False
    show_edges = "--edges" in sys.argv
    for crate_dir in [a for a in sys.argv[1:] if a != "--edges"]:
        crate = Crate(crate_dir)
        edges = crate.edges()
        named = lambda m: "::".join((crate.name,) + m)
        if show_edges:
            for a in sorted(edges):
                for b in sorted(edges[a]):
                    print(named(a), named(b))
            continue
        found = cycles(edges)
        for scc in found:
            failed = True
            print(f"{crate.name}: module cycle: " + " <-> ".join(map(named, scc)))
            for a in scc:
                for b in sorted(edges.get(a, set()) & set(scc)):
                    print(f"    {named(a)} uses {named(b)}")
        if not found:
            count = sum(map(len, edges.values()))
            print(f"{crate.name}: {len(crate.modules)} modules, {count} use edges, no cycle")
    sys.exit(1 if failed else 0)


main()
