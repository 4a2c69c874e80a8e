"""Imports point one way: server -> engine -> model -> kernels, and nothing imports in a circle.

Every module of the package is parsed (no import runs), and every import statement counts:
top-level, inside functions (lazy imports) and under TYPE_CHECKING alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moeserve"

# Package -> the moeserve packages it must not import.
FORBIDDEN = {
    "moeserve.kernels": ("moeserve.model", "moeserve.engine", "moeserve.server"),
    "moeserve.model": ("moeserve.engine", "moeserve.server"),
    "moeserve.engine": ("moeserve.server",),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import mod` imports the submodule pkg.mod.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_layers_import_downwards_only() -> None:
    graph = _graph()
    bad = [
        f"{name} imports {dep}"
        for name, deps in sorted(graph.items())
        for package, forbidden in FORBIDDEN.items()
        if _in(name, package)
        for dep in sorted(deps)
        if any(_in(dep, f) for f in forbidden)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_see_the_imports_they_forbid(tmp_path: Path) -> None:
    """The parser finds lazy, relative and from-imports (else the rules above check nothing)."""
    modules = {"moeserve.a.b": Path(), "moeserve.a.c": Path(), "moeserve.d": Path()}
    probe = tmp_path / "b.py"
    probe.write_text(
        "from . import c\n"
        "def f():\n"
        "    from moeserve.d import x\n"
        "if TYPE_CHECKING:\n"
        "    import moeserve.a.c\n"
    )
    assert _imports("moeserve.a.b", probe, modules) == {"moeserve.a.c", "moeserve.d"}
    assert _graph()["moeserve.engine.runner"] >= {"moeserve.engine.cuda_graphs"}
