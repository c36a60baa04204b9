"""The package's import graph: no circles, no imports of the package inside functions, rooms in one direction.

Read from the source (``ast``), so it sees every import, including those a test run never executes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffcl_algo"

#: each room and the rooms it may import (leaves: networks, diffusion, losses, schedules, utils)
ALLOWED = {
    "cli": {"utils"},  # commands are imported by name (importlib) when called
    "bundle": {"training", "inference", "evaluation", "data", "networks", "utils"},
    "auto3dseg": {"bundle", "inference", "evaluation", "data", "networks", "utils"},
    "demo": {"bundle", "evaluation", "convert", "data", "utils"},
    "training": {"contrastive", "evaluation", "data", "networks", "diffusion", "losses", "schedules", "utils"},
    "contrastive": {"losses"},
    "inference": {"data", "utils"},
    "evaluation": {"data", "utils"},
    "convert": {"data", "utils"},  # offline conversion; nothing at training or inference time imports it
    "data": {"utils"},
    "networks": set(),
    "diffusion": set(),
    "losses": set(),
    "schedules": {"utils"},
    "utils": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """``(package modules imported at module level, package imports found inside functions)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        names = [n for n in names if n.split(".")[0] == "diffcl_algo"]
        if not names:
            continue
        if node.col_offset > 0:
            nested.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
        top.update(names)
    return top, nested


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph, nested = {}, []
    for name, path in modules.items():
        found, inner = _imports(path)
        nested += inner
        graph[name] = {m for m in found if m in modules and m != name}
    return graph, nested


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else "diffcl_algo"


def test_no_import_cycle():
    graph, _ = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_import_inside_functions():
    _, nested = _graph()
    assert not nested, f"imports of diffcl_algo inside functions (they hide a circle or a layer break): {nested}"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_in_one_direction(room):
    graph, _ = _graph()
    wrong = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if _room(module) == room
        for dep in deps
        if _room(dep) not in ALLOWED[room] | {room, "diffcl_algo"}
    )
    assert not wrong, wrong
