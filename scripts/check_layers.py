#!/usr/bin/env python3
"""Layering checks over src/ (Python 3 standard library only).

Default: file-level import cycles. Every `src/**/*.rs` file reachable from a crate root
(`src/lib.rs`, `src/main.rs`, through `mod x;` declarations) is read with its comments, doc
comments, string literals and `#[cfg(test)]` items blanked out. Its imports are

  * `use` trees (`use crate::a::{b, c::D};`, `pub use`, `use super::…`, `use self::…`, a first
    segment naming a child module declared in the file),
  * inline paths in code: `crate::a::b`, `super::…`, `self::…`, `$crate::…`, a child module's
    `name::…`, `gps_seg::…` (the library from the binary), and `alias::…` where `alias` is a
    module brought in by a `use` of the same file.

Each path is resolved to a file: `crate::a::b::C` is `src/a/b.rs` or `src/a/b/mod.rs`, else the
longest prefix that is a module file (so an item re-exported by a `mod.rs` ties the importer to
that `mod.rs`, and the `mod.rs`'s own `pub use` ties it to the file defining the item). `super`
inside an inline `mod m { … }` means the file itself. A file's edges to itself are dropped.
The check fails (exit 1) when the graph has a strongly connected component of more than one
file, and prints each one with the edges inside it and the names that tie them.

`--max-fn-lines N --under DIR…` instead checks that no `fn` item under the DIRs is longer than
N lines (signature line to the closing brace at the signature's indentation; `#[cfg(test)]`
code is not counted), printing file:line, name and length of each one over.

Usage: scripts/check_layers.py [--root REPO] [--max-fn-lines N --under src/cli src/train]
"""

import argparse
import bisect
import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


# ---------------------------------------------------------------------------------------------
# Source text: comments and literals blanked, `#[cfg(test)]` items blanked (lines kept).
# ---------------------------------------------------------------------------------------------


def blank(chars, start, end):
    """Replace chars[start:end] with spaces, keeping newlines (line numbers stay)."""
    for i in range(start, end):
        if chars[i] != "\n":
            chars[i] = " "


def strip_comments_and_literals(src):
    """The source with every comment and the contents of every string / char literal blanked.
    Quotes are kept so the code's shape stays readable; lifetimes are left alone."""
    out = list(src)
    n = len(src)
    i = 0
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(out, i, j)
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
            blank(out, i, j)
            i = j
        elif c in "rb" and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'(?:br|r)(#*)"', src[i:i + 260])
            if m:
                close = '"' + m.group(1)
                j = src.find(close, i + m.end())
                j = n if j < 0 else j + len(close)
                blank(out, i + m.end(), j - len(close))
                i = j
            elif src.startswith('b"', i) or src.startswith("b'", i):
                i += 1  # the literal itself is handled at the quote
            else:
                i += 1
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(out, i + 1, min(j, n))
            i = j + 1
        elif c == "'":
            if i + 1 < n and src[i + 1] == "\\":
                j = src.find("'", i + 2)
                j = n if j < 0 else j
                blank(out, i + 1, j)
                i = j + 1
            elif i + 2 < n and src[i + 2] == "'":
                blank(out, i + 1, i + 2)
                i += 3
            else:
                i += 1  # a lifetime or a label
        else:
            i += 1
    return "".join(out)


def matching_brace(text, open_at):
    """Index just past the `}` closing the `{` at `open_at` (text has no comments/literals)."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def item_end(text, start):
    """End of the item starting at `start`: past its `;` or its balanced `{ … }` body,
    whichever comes first at bracket depth 0."""
    depth = 0
    for j in range(start, len(text)):
        ch = text[j]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch == ";":
            return j + 1
        elif depth == 0 and ch == "{":
            return matching_brace(text, j)
    return len(text)


CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
ATTR = re.compile(r"\s*#\s*\[")


def strip_cfg_test(text):
    """Blank every item carrying `#[cfg(test)]` (test modules, test-only fns and uses)."""
    out = list(text)
    pos = 0
    while True:
        m = CFG_TEST.search(text, pos)
        if not m:
            break
        j = m.end()
        while True:  # further attributes on the same item
            a = ATTR.match(text, j)
            if not a:
                break
            depth, k = 0, a.end() - 1
            while k < len(text):
                if text[k] == "[":
                    depth += 1
                elif text[k] == "]":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            j = k + 1
        end = item_end(text, j)
        blank(out, m.start(), end)
        pos = end
    return "".join(out)


def code_of(src):
    return strip_cfg_test(strip_comments_and_literals(src))


# ---------------------------------------------------------------------------------------------
# Module tree: crate roots and `mod x;` declarations.
# ---------------------------------------------------------------------------------------------

MOD_DECL = re.compile(r"(?<![\w:])mod\s+(" + IDENT + r")\s*([;{])")


def inline_mods(code):
    """[(start, end, name)] of inline `mod name { … }` blocks."""
    spans = []
    for m in MOD_DECL.finditer(code):
        if m.group(2) == "{":
            spans.append((m.start(), matching_brace(code, m.end() - 1), m.group(1)))
    return spans


def inline_stack(spans, pos):
    return [name for (s, e, name) in spans if s <= pos < e]


class Crate:
    def __init__(self, name, root_file):
        self.name = name
        self.modules = {}  # tuple(path) -> file


class Tree:
    """Every module file reached from the crate roots, with its crate and module path."""

    def __init__(self, root):
        self.root = root
        self.files = {}  # rel file -> (crate, module path tuple, code)
        self.crates = {}
        lib = os.path.join("src", "lib.rs")
        main = os.path.join("src", "main.rs")
        for cname, rf in (("lib", lib), ("bin", main)):
            if os.path.exists(os.path.join(root, rf)):
                crate = Crate(cname, rf)
                self.crates[cname] = crate
                self._walk(crate, rf, ())

    def _read(self, rel):
        with open(os.path.join(self.root, rel), encoding="utf-8") as f:
            return f.read()

    def _walk(self, crate, rel, modpath):
        code = code_of(self._read(rel))
        crate.modules[modpath] = rel
        self.files[rel] = (crate, modpath, code)
        base = os.path.basename(rel)
        d = os.path.dirname(rel)
        if base not in ("mod.rs", "lib.rs", "main.rs"):
            d = os.path.join(d, base[:-3])
        spans = inline_mods(code)
        for m in MOD_DECL.finditer(code):
            if m.group(2) != ";" or inline_stack(spans, m.start()):
                continue
            name = m.group(1)
            for cand in (os.path.join(d, name + ".rs"), os.path.join(d, name, "mod.rs")):
                if os.path.exists(os.path.join(self.root, cand)):
                    self._walk(crate, cand, modpath + (name,))
                    break

    def resolve(self, crate, segs):
        """The file a crate-absolute path points to: its longest prefix that is a module."""
        for k in range(len(segs), -1, -1):
            f = crate.modules.get(tuple(segs[:k]))
            if f is not None:
                return f
        return None


# ---------------------------------------------------------------------------------------------
# Imports of one file.
# ---------------------------------------------------------------------------------------------

TOKEN = re.compile(r"\$?" + IDENT + r"|::|[{},*;]")


def use_leaves(body):
    """The leaves of a use tree as (path, name bound): `a::{b, c::{self, D as E}}` →
    (a::b, b), (a::c, c), (a::c::D, E); a glob leaf ends in `*` and binds nothing."""
    toks = TOKEN.findall(body)
    pos = 0

    def tree(prefix):
        nonlocal pos
        path = list(prefix)
        alias = None
        while pos < len(toks):
            t = toks[pos]
            if t == "{":
                pos += 1
                leaves = []
                while pos < len(toks) and toks[pos] != "}":
                    leaves += tree(path)
                    if pos < len(toks) and toks[pos] == ",":
                        pos += 1
                pos += 1
                return leaves
            if t in (",", "}", ";"):
                break
            pos += 1
            if t == "::":
                continue
            if t == "as":
                if pos < len(toks):
                    alias = toks[pos]
                    pos += 1
                continue
            if t == "self" and prefix and len(path) == len(prefix):
                continue  # `a::{self, …}`: `a` itself
            path.append(t)
        if not path:
            return []
        return [(path, alias or (None if path[-1] == "*" else path[-1]))]

    out = []
    while pos < len(toks):
        out += tree([])
        if pos < len(toks) and toks[pos] == ",":
            pos += 1
        else:
            break
    return out


USE = re.compile(r"(?<![\w:])use\s+")
INLINE = re.compile(r"(?<![\w:$])(\$crate|crate|super|self|" + IDENT + r")((?:\s*::\s*" + IDENT + r")+)")


class Importer:
    def __init__(self, tree, rel):
        self.tree = tree
        self.rel = rel
        self.crate, self.modpath, self.code = tree.files[rel]
        self.spans = inline_mods(self.code)
        self.lines = [0] + [i + 1 for i, ch in enumerate(self.code) if ch == "\n"]
        base = os.path.basename(rel)
        d = os.path.dirname(rel)
        if base not in ("mod.rs", "lib.rs", "main.rs"):
            d = os.path.join(d, base[:-3])
        self.children = set()
        for m in MOD_DECL.finditer(self.code):
            if m.group(2) == ";":
                self.children.add(m.group(1))
        self.aliases = {}  # name -> (crate, absolute module path)
        self.edges = []  # (target file, written name, line)

    def line(self, pos):
        return bisect.bisect_right(self.lines, pos)

    def absolute(self, segs, pos):
        """(crate, crate-absolute segments) of a path written at `pos`, or None (external)."""
        here = list(self.modpath) + inline_stack(self.spans, pos)
        head = segs[0]
        if head in ("crate", "$crate"):
            return self.crate, segs[1:]
        if head == "gps_seg" and "lib" in self.tree.crates:
            return self.tree.crates["lib"], segs[1:]
        if head in ("super", "self"):
            k = 0
            while k < len(segs) and segs[k] in ("super", "self"):
                if segs[k] == "super":
                    here = here[:-1]
                k += 1
            return self.crate, here + segs[k:]
        if head in self.children and not inline_stack(self.spans, pos):
            return self.crate, here + segs
        if head in self.aliases:
            crate, mod = self.aliases[head]
            return crate, list(mod) + segs[1:]
        return None

    def add(self, segs, pos, written):
        a = self.absolute(segs, pos)
        if a is None:
            return None
        crate, abs_segs = a
        target = self.tree.resolve(crate, abs_segs)
        if target is not None and target != self.rel:
            self.edges.append((target, written, self.line(pos)))
        return crate, abs_segs

    def scan(self):
        code = self.code
        use_spans = []
        for m in USE.finditer(code):
            end = item_end(code, m.end())
            use_spans.append((m.start(), end))
            for leaf, bound in use_leaves(code[m.end():end]):
                segs = [x for x in leaf if x != "*"]
                if not segs:
                    continue
                r = self.add(segs, m.start(), "::".join(leaf))
                if r is not None and bound is not None and bound != "_":
                    crate, abs_segs = r
                    if tuple(abs_segs) in crate.modules:
                        self.aliases[bound] = (crate, tuple(abs_segs))
        starts = [s for s, _ in use_spans]
        for m in INLINE.finditer(code):
            k = bisect.bisect_right(starts, m.start()) - 1
            if k >= 0 and use_spans[k][0] <= m.start() < use_spans[k][1]:
                continue
            segs = [m.group(1)] + re.findall(IDENT, m.group(2))
            self.add(segs, m.start(), "::".join(segs))
        return self.edges


# ---------------------------------------------------------------------------------------------
# Cycles: strongly connected components (Tarjan, iterative).
# ---------------------------------------------------------------------------------------------


def sccs(nodes, succ):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(succ.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def check_cycles(root, show=None):
    tree = Tree(root)
    names = defaultdict(list)  # (src, dst) -> [(written, line)]
    for rel in sorted(tree.files):
        for target, written, line in Importer(tree, rel).scan():
            names[(rel, target)].append((written, line))
    succ = defaultdict(set)
    for a, b in names:
        succ[a].add(b)
    if show:
        for a in sorted(succ):
            if any(a.startswith(os.path.normpath(p)) for p in show):
                for b in sorted(succ[a]):
                    print(f"{a} -> {b}: " + ", ".join(sorted({w for w, _ in names[(a, b)]})))
    comps = [c for c in sccs(tree.files.keys(), succ) if len(c) > 1]
    comps.sort(key=lambda c: (c[0], len(c)))
    edges = sum(len(v) for v in succ.values())
    if not comps:
        print(f"check_layers: {len(tree.files)} files, {edges} file-level imports, no cycles")
        return 0
    print(f"check_layers: {len(comps)} import cycle(s) among {len(tree.files)} files:")
    for k, comp in enumerate(comps, 1):
        print(f"\ncycle {k} ({len(comp)} files): " + ", ".join(comp))
        inside = set(comp)
        for a in comp:
            for b in sorted(succ[a] & inside):
                seen, shown = set(), []
                for written, line in names[(a, b)]:
                    if written not in seen:
                        seen.add(written)
                        shown.append(f"{written} (:{line})")
                print(f"  {a} -> {b}: " + ", ".join(shown))
    return 1


# ---------------------------------------------------------------------------------------------
# Function length.
# ---------------------------------------------------------------------------------------------

FN = re.compile(
    r"^([ \t]*)(?:pub(?:\s*\([^)]*\))?\s+)?(?:default\s+)?(?:const\s+)?(?:async\s+)?"
    r"(?:unsafe\s+)?(?:extern\s+\"[^\"]*\"\s+)?fn\s+(" + IDENT + r")",
    re.M,
)


def check_fn_lengths(root, limit, under):
    over = []
    counted = 0
    for d in under:
        for dirpath, _, files in os.walk(os.path.join(root, d)):
            for f in sorted(files):
                if not f.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    code = code_of(fh.read())
                lines = code.split("\n")
                for m in FN.finditer(code):
                    start_line = code.count("\n", 0, m.start())
                    indent = m.group(1)
                    # a declaration without a body ends at `;` before any `{`
                    end = item_end(code, m.end())
                    if code[end - 1] == ";":
                        continue
                    counted += 1
                    stop = start_line
                    for j in range(start_line, len(lines)):
                        ln = lines[j]
                        if j > start_line and ln.startswith(indent + "}"):
                            stop = j
                            break
                        if j == start_line and code.count("\n", m.start(), end) == 0:
                            stop = j  # body on the signature's line
                            break
                    length = stop - start_line + 1
                    if length > limit:
                        rel = os.path.relpath(path, root)
                        over.append((rel, start_line + 1, m.group(2), length))
    if not over:
        print(f"check_layers: {counted} functions under {', '.join(under)}, none over {limit} lines")
        return 0
    print(f"check_layers: {len(over)} function(s) over {limit} lines:")
    for rel, line, name, length in sorted(over):
        print(f"  {rel}:{line} {name}: {length} lines")
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--max-fn-lines", type=int, help="check function lengths instead of cycles")
    ap.add_argument("--under", nargs="+", default=["src/cli", "src/train"])
    ap.add_argument("--edges", nargs="+", metavar="DIR", help="also print the imports of files under DIR")
    a = ap.parse_args()
    root = os.path.normpath(a.root)
    if a.max_fn_lines is not None:
        return check_fn_lengths(root, a.max_fn_lines, a.under)
    return check_cycles(root, a.edges)


if __name__ == "__main__":
    sys.exit(main())
