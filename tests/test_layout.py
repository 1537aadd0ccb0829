"""The package layout (README, "Code map"): layered subpackages and no import cycles.

The graph is read from the source with ``ast`` (nothing is imported): an edge A -> B for
each ``import``/``from ... import`` of a module B of this project in module A, relative
imports resolved, ``from pkg import mod`` counted as importing the submodule ``mod``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "scu_sweep", ROOT / "hydra_plugins" / "scu_launcher",
           ROOT / "hydra_plugins" / "scu_optuna_sweeper"]

# Lowest first; a module may import from its own layer and the layers below it.
LAYERS = [
    ("scu", ("scu_sweep.scu",)),  # pure SCU math and rules: stdlib only
    ("base", ("scu_sweep.records", "scu_sweep.paths", "scu_sweep.redact")),  # stdlib only
    ("config", ("scu_sweep.config", "scu_sweep.validation", "scu_sweep.cli_check")),
    ("models", ("scu_sweep.models",)),
    ("training", ("scu_sweep.training",)),
    ("tracking", ("scu_sweep.tracking",)),
    ("sweeps", ("scu_sweep.sweeps",)),
    ("entry", ("scu_sweep.run", "scu_sweep.ranks", "scu_sweep.__main__", "scu_sweep.report",
               "scu_sweep.export_peft", "scu_sweep")),
    ("plugins", ("hydra_plugins",)),
]
LEAVES = ("scu_sweep.records", "scu_sweep.paths", "scu_sweep.redact")  # import nothing of ours


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    """{module name: path} for every .py file of the project's packages."""
    return {module_name(p): p for src in SOURCES for p in sorted(src.rglob("*.py"))}


def _top_level(tree: ast.Module):
    """Statements run at import: the module body and the bodies of its if/try/with/class
    blocks, never a function's body."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, None) or [])


def _resolve(name: str, known: set) -> str | None:
    """``name`` or its nearest enclosing module that is ours, else None (another library)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: set, everywhere: bool = False) -> set:
    """The project modules ``name`` imports (at module level unless ``everywhere``)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if everywhere else _top_level(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in (_resolve(t, known) for t in targets) if t and t != name)
    return found


def graph(everywhere: bool = False) -> dict:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known, everywhere) for m, p in mods.items()}


def find_cycle(g: dict) -> list | None:
    """One cycle of ``g`` as [a, b, ..., a], or None."""
    state: dict = {}  # 1: on the current path, 2: done
    stack: list = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layer(module: str) -> int | None:
    """Index in LAYERS of the most specific prefix that names ``module``; None if none does."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "scu_sweep" and module.startswith(p + "."))  # new modules need a layer
            if inside and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def violations(g: dict) -> list:
    bad = []
    for src, dsts in sorted(g.items()):
        for dst in sorted(dsts):
            if layer(src) is None or layer(dst) is None:
                continue  # test_every_module_has_a_layer names it
            if layer(dst) > layer(src):
                bad.append(f"{src} ({LAYERS[layer(src)][0]}) imports {dst} ({LAYERS[layer(dst)][0]})")
            elif src.startswith("scu_sweep.scu.") and not dst.startswith("scu_sweep.scu."):
                bad.append(f"{src}: the pure core imports {dst}")
            elif src in LEAVES:
                bad.append(f"{src}: a leaf module imports {dst}")
    return bad


def test_the_graph_is_read():
    g = graph()
    assert "scu_sweep.training.loop" in g["scu_sweep.run"]
    assert "scu_sweep.scu.controller" in g["scu_sweep.config"]
    assert "scu_sweep.sweeps.lifeline" in g["hydra_plugins.scu_launcher._core"]


def test_no_import_cycle_at_module_level():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_counting_imports_inside_functions():
    """Function-level imports stay only to keep start-up cheap, never to dodge a cycle."""
    cycle = find_cycle(graph(everywhere=True))
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)


@pytest.mark.parametrize("everywhere", [False, True], ids=["module-level", "all"])
def test_layers_import_only_downwards(everywhere):
    bad = violations(graph(everywhere))
    assert not bad, "\n".join(bad)


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer(m) is None]
    assert not unplaced, f"in no layer: {unplaced}; add them to LAYERS and to the README's code map"
    assert layer("scu_sweep.a_new_module") is None  # a new top-level module is not placed by default
    assert layer("scu_sweep.tracking.a_new_module") == layer("scu_sweep.tracking.report")


def test_subpackages_import_nothing_on_their_own():
    """Importing ``scu_sweep.training.backend`` must not import MLX before it preloads BLAS:
    the packages' ``__init__`` files import nothing."""
    for m, p in modules().items():
        if p.name == "__init__.py" and m.startswith("scu_sweep"):
            tree = ast.parse(p.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                        and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")], m


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
