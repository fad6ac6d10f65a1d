"""mislib's import graph: imports run one way, with no cycle (docs/design.md, Dependencies).

The graph is read from the source with ``ast`` rather than by importing, so function-level
imports (which hide a cycle from the interpreter until the function runs) count too. An edge
``a -> b`` means module ``a`` imports module ``b`` somewhere in its file; ``from pkg import
name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

import pytest

import mislib

PACKAGE_DIR = Path(mislib.__file__).parent

#: Edges of a cycle that another issue is removing: (importer, imported) -> why. Empty
#: when the graph is clean; an edge listed here that no longer exists fails the test, so the
#: list cannot go stale.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mislib_modules() -> dict[str, Path]:
    """Every module of mislib: dotted name -> file."""
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """mislib's modules and every import between them, at any depth of the file.

    Returns ``{module: the mislib modules it imports}``.
    """
    modules = mislib_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name in modules:
        graph[name] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                # `import mislib.a.b` names mislib.a.b; keep the longest known module prefix.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "mislib":
                    graph[name].add(target)
    return dict(graph)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]`` (each imports the next), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        return list(reversed(err.args[1]))
    return None


def descendants(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph[module])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # mislib.analysis scores raw results itself when stage 06 has not run, importing
    # mislib.scoring inside a function.
    assert "mislib.scoring" in graph[_first_module_with("from mislib import scoring")]


def _first_module_with(text: str) -> str:
    for name, path in mislib_modules().items():
        if text in path.read_text():
            return name
    pytest.fail(f"no mislib module contains {text!r}")


def test_mislib_has_no_import_cycle():
    graph = import_graph()
    stale = [(a, b) for a, b in KNOWN_CYCLE_EDGES if b not in graph.get(a, ())]
    assert not stale, f"known cycle edges that no longer exist (remove them): {stale}"
    for a, b in KNOWN_CYCLE_EDGES:
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle inside mislib: " + " -> ".join(cycle)


def test_find_cycle_names_the_modules_of_a_cycle_and_none_without_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_the_shared_foundations_import_no_stage():
    graph = import_graph()
    # structures: the curated structure lists and readable names, which the profile schema
    # (config) checks names against.
    foundations = ("mislib.paths", "mislib.config", "mislib.vocabulary", "mislib.geometry",
                   "mislib.structures", "mislib.answers", "mislib.bayes")
    allowed = set(foundations)
    for module in foundations:
        outside = sorted(descendants(graph, module) - allowed)
        assert not outside, f"{module} depends on {outside}"
