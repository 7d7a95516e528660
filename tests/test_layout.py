"""The layout's promises, checked on the source: no import cycles, every package says what it
is for, and the lower layers never import the ones above them.

Imports are read with ``ast`` (module level and inside functions alike), so a cycle hidden in a
function-local import counts too; that is how ``moto_server -> moto_extensions ->
moto_placement_groups -> moto_server`` once went unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "mpi_jobs", "event_bridge", "infra")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports (``from a import b`` counts ``a.b`` if a module)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _drop_package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package importing its own submodules (and they the package) is not a design cycle."""
    return {m: {t for t in deps if not (t.startswith(m + ".") or m.startswith(t + "."))}
            for m, deps in graph.items()}


def test_no_import_cycles() -> None:
    cycles = _cycles(_drop_package_edges(_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("lower,upper", [("infra", "flows"), ("infra", "event_bridge"),
                                         ("mpi_jobs", "flows"), ("mpi_jobs", "infra")])
def test_lower_layers_do_not_import_upper_ones(lower: str, upper: str) -> None:
    bad = sorted(f"{m} -> {t}" for m, deps in _graph().items() if m.split(".")[0] == lower
                 for t in deps if t.split(".")[0] == upper)
    assert not bad, f"{lower} must not import {upper}:\n" + "\n".join(bad)


def test_every_package_says_what_it_is_for() -> None:
    missing = [str(p.relative_to(REPO)) for pkg in PACKAGES
               for p in (REPO / pkg).rglob("__init__.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"packages without a docstring: {missing}"
