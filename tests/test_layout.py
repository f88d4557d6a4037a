"""The code's layout, as a specification: no import cycles, a Kafka-free core, modules that stay readable.

Imports are read from the source (every ``import`` and ``from ... import``, also those inside functions),
so a cycle hidden behind a lazy import fails here as well as one at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fpocmh", "fpocmh_core", "consumers", "producers")
# A module longer than this says at its top why it is one module.
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports: ``from a.b import c`` names ``a.b.c`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_two_modules_import_each_other_directly_or_around_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_a_kafka_client_nor_the_pipeline():
    offenders = []
    for name, path in project_modules().items():
        if not name.startswith("fpocmh_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            offenders += [f"{name} imports {t}" for t in targets if t.split(".")[0] in {"confluent_kafka", "consumers"}]
    assert offenders == []


def test_no_role_or_runtime_module_imports_a_benchmark():
    graph = import_graph()
    offenders = [
        f"{name} imports {dep}"
        for name, deps in graph.items()
        if name.startswith("consumers") and not name.startswith("consumers.bench")
        for dep in deps
        if dep.startswith("consumers.bench")
    ]
    assert offenders == []


def test_the_top_of_consumers_holds_the_runtime_and_packages_only():
    roles = {"encoder", "learner", "query"}
    packages = {p.name for p in (ROOT / "consumers").iterdir() if (p / "__init__.py").exists()}
    assert roles | {"brokers", "bench"} <= packages
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((ROOT / "consumers" / pkg / "__init__.py").read_text()))
        assert doc, f"consumers/{pkg}/__init__.py says its contract in a docstring"


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_a_long_module_says_why_it_is_one_module(name):
    path = project_modules()[name]
    lines = path.read_text().count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "One module" in doc, f"{path.relative_to(ROOT)}: {lines} lines and no 'One module ...' reason at its top"
