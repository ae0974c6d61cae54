"""The architecture as a test: which package may import which, and no import cycles.

Every import statement counts, module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only). Layers of ``cbstore`` from the bottom: ``errors``;
``format`` (what a store is, no I/O); ``store`` (reading and writing); ``inputs`` (model inputs)
beside ``build`` (the pipeline); ``synth`` (a synthetic source, which reads the build's packaged
definitions). ``cbstore`` never imports ``encoders``, ``fusion`` or ``cli``; ``encoders`` never
imports ``fusion`` or ``cli``; ``fusion`` never imports ``cli``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = ("cbstore", "encoders", "fusion", "cli")

#: What each part may import of the project (besides itself). "cbstore" alone is the package root
#: (its ``__version__``); it imports only ``cbstore.format``.
ALLOWED = {
    "cbstore": {"cbstore.errors", "cbstore.format"},
    "cbstore.errors": set(),
    "cbstore.format": {"cbstore.errors"},
    "cbstore.store": {"cbstore", "cbstore.errors", "cbstore.format"},
    "cbstore.inputs": {"cbstore.errors", "cbstore.format", "cbstore.store"},
    "cbstore.build": {"cbstore", "cbstore.errors", "cbstore.format", "cbstore.store"},
    "cbstore.synth": {"cbstore.errors", "cbstore.build"},
    "cbstore.testing": {"cbstore", "cbstore.errors", "cbstore.format"},
}
#: The same for the other top-level packages, by top-level name ("cbstore": any part of it).
ALLOWED_TOP = {"encoders": {"cbstore"}, "fusion": {"cbstore", "encoders"}, "cli": {"cbstore", "encoders", "fusion"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """The entry of :data:`ALLOWED` or :data:`ALLOWED_TOP` a module belongs to."""
    parts = module.split(".")
    if parts[0] == "cbstore":
        return ".".join(parts[:2])
    return parts[0]


def _imports(tree: ast.AST, modules=()) -> set[str]:
    """Project modules imported anywhere in ``tree``, skipping ``if TYPE_CHECKING:`` blocks.

    ``from package import name`` counts as an import of ``package.name`` when that is one of
    ``modules``, else of ``package``.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] in TOP}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for top in TOP for p in (REPO / top).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


GRAPH = _graph()


def test_the_graph_sees_the_packages():
    assert "cbstore.store.reader" in GRAPH["cbstore.inputs.reader"] or \
        "cbstore.format.tasks" in GRAPH["cbstore.inputs.reader"]
    assert {"cbstore.format.schema", "cbstore.build.pipeline", "fusion.trainer", "cli.main"} <= set(GRAPH)


def _allowed(part: str, target: str) -> bool:
    if _part(target) == part:
        return True
    if part in ALLOWED_TOP:
        return target.split(".")[0] in ALLOWED_TOP[part]
    return _part(target) in ALLOWED[part]


@pytest.mark.parametrize("part", sorted(ALLOWED) + sorted(ALLOWED_TOP))
def test_imports_follow_the_layers(part):
    bad = sorted(f"{module} imports {target}"
                 for module, targets in GRAPH.items() if _part(module) == part
                 for target in targets if not _allowed(part, target))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_part():
    assert not sorted(m for m in GRAPH if _part(m) not in ALLOWED and _part(m) not in ALLOWED_TOP)


def test_the_rules_reject_an_upward_import():
    assert not _allowed("cbstore.format", "cbstore.store.reader")
    assert not _allowed("cbstore.store", "cbstore.build.pipeline")
    assert not _allowed("cbstore.build", "cbstore.inputs.reader")
    assert not _allowed("cbstore.inputs", "encoders.registry")
    assert not _allowed("encoders", "fusion.trainer")
    assert _allowed("fusion", "cbstore.inputs.reader")


def test_no_import_cycles():
    """Not even through imports inside functions (a lazy import that hides a cycle)."""
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            walk(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_catches_a_lazy_upward_import():
    tree = ast.parse("def f():\n    from fusion.trainer import fit\n"
                     "if TYPE_CHECKING:\n    from cli.main import main\n")
    assert _imports(tree) == {"fusion.trainer"}
    assert _imports(ast.parse("from fusion import trainer"), {"fusion.trainer"}) == {"fusion.trainer"}


def _imported_names() -> set[tuple[str, str]]:
    """Every ``from <project module> import name`` anywhere in the project, as (module, name)."""
    pairs = set()
    for top in TOP:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] in TOP:
                    pairs.update((node.module, alias.name) for alias in node.names)
    return pairs


def test_every_imported_name_exists():
    """A lazy import inside a function is only run when called: check its name resolves now."""
    missing = []
    for module, name in sorted(_imported_names()):
        loaded = importlib.import_module(module)
        if not hasattr(loaded, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"from {module} import {name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
