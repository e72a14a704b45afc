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


# Module-level containers that are constants: filled once at import, never changed after.
# Anything else mutable at module level is state shared by every app in the process (two
# gateways in one test process would see each other's), which rule 5 forbids.
CONSTANTS = {
    "sidecar.addons.idempotency": {"NO_SDK_RETRY"},
    "sidecar.addons.ratelimit": {"SCOPE_NOUNS", "_HEADER_NAMES"},
    "sidecar.client_tokens": {"_REQUIRED_CLAIMS", "_DEFAULT_PORTS"},
    "sidecar.api.admin": {"METRICS_CHALLENGE"},
    "sidecar.api.answers": {"SSE_HEADERS"},
    "sidecar.api.common": {"_METHODS"},
    "sidecar.api.validation": {"_PART_FIELDS"},
    "sidecar.errors": {"_TYPE_BY_STATUS"},
    "sidecar.inject.options": {"RESOURCES", "DEFAULT_RESOURCES", "_BINARY", "_DECIMAL", "_SCALE"},
    "sidecar.inject.review": {"POD_KIND"},
    "sidecar.pipeline": {"_ALIASES", "_NORMALIZED"},
    "sidecar.providers.openai_compat": {"COMPAT_KINDS"},
    "sidecar.schema_check": {"_JSON_OBJECT"},
    "sidecar.schema_compiler": {"_TYPES"},
    "sidecar.settings.reading": {"_SCALAR_TYPES"},
}
# Per process by design, not per app: an id must not repeat within the process whichever app
# draws it (sidecar/ids.py: a random prefix drawn again after fork, and a counter).
PER_PROCESS = {"sidecar.ids": {"_prefix", "_counter"}}

_MUTABLE_DISPLAYS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
_MUTABLE_FACTORIES = {
    "set", "dict", "list", "bytearray", "deque", "defaultdict", "OrderedDict", "Counter",
    "count", "WeakSet", "WeakValueDictionary", "WeakKeyDictionary", "Event", "Lock", "Queue",
}  # fmt: skip


def _is_mutable(value: ast.expr) -> bool:
    if isinstance(value, _MUTABLE_DISPLAYS):
        return True
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        return name in _MUTABLE_FACTORIES
    return False


def module_state(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level to a mutable container, plus every name a
    function rebinds with `global` (module state however it is made)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if _is_mutable(value):
            found.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.update(node.names)
    return found - {"__all__"}


def test_the_state_scan_sees_containers_and_globals() -> None:
    tree = ast.parse(
        "import asyncio\n_tasks: set[asyncio.Task[None]] = set()\nCACHE = {}\nNAMES = ('a',)\n"
        "def f():\n    global _n\n    _n = 1\n"
    )
    assert module_state(tree) == {"_tasks", "CACHE", "_n"}


def test_no_module_level_mutable_state() -> None:
    allowed = {
        module: CONSTANTS.get(module, set()) | PER_PROCESS.get(module, set())
        for module in module_files()
    }
    unexpected = {
        module: sorted(names)
        for module, path in module_files().items()
        if (names := module_state(ast.parse(path.read_text(), str(path))) - allowed[module])
    }
    assert unexpected == {}, "module-level state: put it on the object that owns it"


def test_the_allow_lists_name_only_what_exists() -> None:
    files = module_files()
    for module, names in (CONSTANTS | PER_PROCESS).items():
        assert names <= module_state(ast.parse(files[module].read_text())), module
