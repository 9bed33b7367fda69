"""Packages import one way (README, Layout): scripts/import_graph.py finds no cycle among strata's packages."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


def _load():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycle_between_packages():
    g = _load()
    edges = g.graph(top_only=False)  # imports inside functions count too
    assert "layers" in edges and "quant" in edges["layers"]  # the graph was read
    assert g.cycles(edges) == []


def test_a_cycle_is_found():
    g = _load()
    edges = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:1"]}, "d": {"a": ["d.py:1"]}}
    assert g.cycles(edges) == [["a", "b", "c"]]
