"""Imports between Strata's packages: prints each package's dependencies and any cycle among them.

    python scripts/import_graph.py            # every import, also those inside functions
    python scripts/import_graph.py --top      # module-level imports only

A package is strata/<name>/ or a top-level module (strata/config.py is "config"). Exits 1 on a cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "strata"


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "strata":
        return None
    return parts[1] if len(parts) > 1 else "strata"


def imports(path: Path, top_only: bool):
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for a in node.names:  # `from strata import tiers`
                yield f"{node.module}.{a.name}", node.lineno


def graph(top_only: bool) -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = package_of(".".join(rel.parts))
        for module, line in imports(path, top_only):
            dst = package_of(module)
            if dst and dst != src and dst != "strata" and (ROOT / dst).exists() | (ROOT / f"{dst}.py").exists():
                where = f"{rel}.py:{line}"
                if where not in edges[src][dst]:
                    edges[src][dst].append(where)
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", action="store_true", help="module-level imports only")
    args = ap.parse_args()
    edges = graph(args.top)
    for src in sorted(edges):
        print(f"{src:12s} -> {', '.join(sorted(edges[src]))}")
    found = cycles(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
        for a in comp:
            for b in comp:
                for where in edges.get(a, {}).get(b, []):
                    print(f"  {a} -> {b}  {where}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
