"""The rooms of docs/architecture.md and which way their imports go.

Read from the source with ``ast``, not by importing it: every import statement counts,
wherever it sits (in a function, under ``if TYPE_CHECKING``), and so does
``__import__("x")`` or ``import_module("x")`` with a literal name. A module's edge goes
to the module it names (``from a import b`` names ``a.b`` when that is a module).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT, source_files

ARCHITECTURE = ROOT / "docs" / "architecture.md"
IMPORTERS = {"__import__", "import_module"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in source_files()}


def room_of(module: str) -> str:
    return module.split(".")[0]


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` is, or lies in (``a.b.f`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, int]:
    """The modules of ours ``module`` imports, each with the line of one import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from a import b``: the module a.b if there is one, else a itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if called in IMPORTERS and isinstance(first, ast.Constant):
                names = [str(first.value)]
        for name in names:
            target = _ours(name)
            if target is not None and target != module:
                found.setdefault(target, getattr(node, "lineno", 0))
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back():
    graph = {module: imports_of(module) for module in MODULES}
    found = cycles(graph)
    described = [
        [f"{module} -> {target} (line {line})" for module in component
         for target, line in graph[module].items() if target in component]
        for component in found
    ]
    assert not described


def test_the_cycle_check_sees_every_kind_of_import():
    """A cycle made only of a type-checking import and a lazy ``__import__`` (what the
    demo and ``server.py`` had) is one."""
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert imports_of("app.wiring")["demo"]  # the route line's __import__("demo")


def documented_rooms() -> dict[str, set[str] | None]:
    """The rooms table of docs/architecture.md: each room and the rooms it may import
    (None: any)."""
    rooms: dict[str, set[str] | None] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [re.sub(r"(/|\.py)$", "", name) for name in re.findall(r"`([^`]+)`", cells[0])]
        if cells[2].startswith("any room"):
            allowed = None
        elif cells[2] == "nothing of ours":
            allowed = set()
        else:
            allowed = set(re.findall(r"`([^`]+)`", cells[2]))
        rooms.update(dict.fromkeys(names, allowed))
    return rooms


def test_the_table_names_every_room():
    rooms = documented_rooms()
    assert {"core", "storage", "services", "handlers", "app", "server"} <= set(rooms)
    assert {room_of(module) for module in MODULES} == set(rooms)
    for allowed in rooms.values():
        assert allowed is None or allowed <= set(rooms)


@pytest.mark.parametrize(
    "room", sorted(room for room, allowed in documented_rooms().items() if allowed is not None)
)
def test_each_room_imports_only_what_the_table_allows(room):
    allowed = documented_rooms()[room]
    assert allowed is not None
    crossing = {
        f"{module} -> {target} (line {line})"
        for module in MODULES if room_of(module) == room
        for target, line in imports_of(module).items()
        if room_of(target) not in allowed | {room}
    }
    assert not crossing


def test_tests_share_helpers_through_the_toolkit_not_each_other():
    """A helper two test modules need lives in the toolkit (tests/support.py, flow.py...),
    so that running or deleting one test module never breaks another."""
    def is_test_module(module: str) -> bool:
        return module.startswith("tests.test_")

    crossing = [
        f"{module} imports {target} (line {line})"
        for module in MODULES if is_test_module(module)
        for target, line in imports_of(module).items() if is_test_module(target)
    ]
    assert not crossing
