"""Rules of ARCHITECTURE.md that the code can be checked against, read with `ast`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"


def module_files() -> dict[str, Path]:
    """Every module of the sidecar package by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for path in sorted(SIDECAR.rglob("*.py")):
        parts = list(path.relative_to(SIDECAR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(tree: ast.AST) -> Iterator[str]:
    """Dotted names imported anywhere a running program can import them: at module level and
    inside functions alike (a cycle through a function-level import is still a cycle), but not
    under `if TYPE_CHECKING:`. `from a import b` yields both `a` and `a.b`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                yield from imported_names(ast.Module(body=[branch], type_ignores=[]))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        yield from imported_names(node)


def import_graph() -> dict[str, set[str]]:
    """Which sidecar modules each sidecar module imports (a submodule's implicit import of its
    package's `__init__` is not an edge: that is how packages work, not a design choice)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        names = set(imported_names(ast.parse(path.read_text(), str(path))))
        graph[name] = {other for other in names if other in files and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    tree = ast.parse("def f():\n    from sidecar.a import x\n")
    assert set(imported_names(tree)) == {"sidecar.a", "sidecar.a.x"}
    graph = {"sidecar.a": {"sidecar.b"}, "sidecar.b": {"sidecar.a"}, "sidecar.c": {"sidecar.a"}}
    assert cycles(graph) == [["sidecar.a", "sidecar.b"]]


def test_imports_under_type_checking_are_not_edges() -> None:
    tree = ast.parse("if TYPE_CHECKING:\n    import sidecar.a\nelse:\n    import sidecar.b\n")
    assert set(imported_names(tree)) == {"sidecar.b"}


def test_the_api_handlers_and_the_app_share_their_keys_without_importing_each_other() -> None:
    graph = import_graph()
    assert "sidecar.appkeys" in graph["sidecar.app"]
    for name, imports in graph.items():
        if name.startswith("sidecar.api"):
            assert "sidecar.app" not in imports, name


def test_no_sidecar_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []
