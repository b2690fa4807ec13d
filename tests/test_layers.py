"""The repository's floors, read from the source: trainables at the bottom, analysis on it, study on top.

Every import counts, at module level or inside a function (a lazy import is an arrow all the same); the notebooks
(`analysis/*.ipynb`) sit above everything and may import any of it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

FLOORS = {"trainables": 0, "analysis": 1, "study": 2}   # a package may import its own floor and the ones below
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """{dotted module name: path} of every Python module of the three packages."""
    found = {}
    for package in FLOORS:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the file at `path` imports (`from a import b` counts a.b when that is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out |= {name for name in names if name in known}
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_no_arrow_points_up_a_floor():
    upward = sorted(f"{source} imports {target}" for source, targets in graph().items() for target in targets
                    if FLOORS[target.split(".")[0]] > FLOORS[source.split(".")[0]])
    assert upward == []


def test_no_module_imports_itself_round_a_circle():
    edges = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(edges[node]):
            if (circle := visit(target, [*path, node])) is not None:
                return circle
        done.add(node)
        return None

    circles = [circle for node in sorted(edges) if (circle := visit(node, [])) is not None]
    assert circles == [], " -> ".join(circles[0])


def test_no_module_is_over_the_line_budget():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_see_the_arrows_they_are_about():
    """The graph is not empty by accident: known arrows are in it."""
    edges = graph()
    assert "trainables.report" in edges["study.trial_end"] and "analysis.pareto" in edges["study.front"]
    assert "study.results.rows" in edges["study.trial_end"]      # a `from study.results.rows import ...`
