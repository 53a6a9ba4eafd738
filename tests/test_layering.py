"""Imports point one way: optim -> extensions -> engine; optim, extensions -> solvers.

The checker resolves relative imports (``from ..engine import state`` in
``curvlib/solvers/cg.py`` is ``curvlib.engine``) against the package of the file, found by
walking up the directories that hold an ``__init__.py``, and counts ``from curvlib import
engine`` as an import of ``curvlib.engine``. ``tests/reliability/test_layering_check.py``
proves that it fails on bad imports.
"""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

PKG = Path(__file__).resolve().parents[1] / "curvlib"
FORBIDDEN = {
    "engine": {"extensions", "solvers", "optim"},
    "solvers": {"engine", "extensions", "optim"},
    "extensions": {"optim"},
}


def package_of(path: Path) -> List[str]:
    """Dotted package of a module file as a list (``curvlib/solvers/cg.py`` -> ``[curvlib, solvers]``;
    a package's ``__init__.py`` belongs to that package)."""
    parts: List[str] = []
    d = path.resolve().parent
    while (d / "__init__.py").exists():
        parts.insert(0, d.name)
        d = d.parent
    return parts


def _resolve(node: ast.ImportFrom, package: List[str], path: Path) -> Optional[str]:
    if node.level == 0:
        return node.module
    if node.level > len(package):
        raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path) -> Iterator[Tuple[str, int]]:
    """Absolute dotted names of every module ``path`` imports, with line numbers. For ``from X
    import a`` both ``X`` and ``X.a`` (``a`` may be a submodule) are reported."""
    package = package_of(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, package, path)
            if module:
                yield module, node.lineno
            for alias in node.names:
                if alias.name != "*":
                    yield f"{module}.{alias.name}" if module else alias.name, node.lineno


def imported_subpackages(path: Path) -> Iterator[Tuple[str, int]]:
    """``(subpackage, line)`` for every import of ``curvlib.<subpackage>`` in ``path`` (once each)."""
    seen = set()
    for name, line in imported_modules(path):
        parts = name.split(".")
        if parts[0] == "curvlib" and len(parts) > 1 and (parts[1], line) not in seen:
            seen.add((parts[1], line))
            yield parts[1], line


def violations(pkg: Path, layer: str) -> List[str]:
    """Imports in ``pkg/<layer>`` of a subpackage that ``layer`` must not import."""
    return [
        f"{path.relative_to(pkg)}:{line} imports curvlib.{sub}"
        for path in sorted((pkg / layer).rglob("*.py"))
        for sub, line in imported_subpackages(path)
        if sub in FORBIDDEN[layer]
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer):
    bad = violations(PKG, layer)
    assert not bad, bad


def test_only_optim_distributed_imports_torch_distributed():
    """Communication stays in ``curvlib/optim/distributed.py``: the engine, the extensions, the
    solvers and the other optimizer modules are single-process code."""
    bad = [
        f"{path.relative_to(PKG)}:{line} imports {name}"
        for path in sorted(PKG.rglob("*.py"))
        if path.relative_to(PKG).as_posix() != "optim/distributed.py"
        for name, line in imported_modules(path)
        if name == "torch.distributed" or name.startswith("torch.distributed.")
        or name.startswith("torch.nn.parallel")
    ]
    assert not bad, bad


def module_name(path: Path) -> str:
    """``curvlib/engine/hooks.py`` -> ``curvlib.engine.hooks`` (a package's ``__init__.py``: the package)."""
    parts = package_of(path)
    return ".".join(parts if path.name == "__init__.py" else parts + [path.stem])


def import_graph(pkg: Path, sub: str) -> Dict[str, Set[str]]:
    """``module -> the modules of curvlib.<sub> it imports``, every import counted (module level,
    inside functions, under ``TYPE_CHECKING``); ``from X import a`` is an import of ``X.a`` when
    that is a module, else of ``X``. A parent package imported on the way is not counted."""
    files = sorted((pkg / sub).rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph: Dict[str, Set[str]] = {}
    for path in files:
        deps: Set[str] = set()
        for tree_node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(tree_node, ast.Import):
                deps.update(a.name for a in tree_node.names if a.name in modules)
            elif isinstance(tree_node, ast.ImportFrom):
                base = _resolve(tree_node, package_of(path), path)
                for a in tree_node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in modules else base)
        name = module_name(path)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One import cycle through each module that is on one (depth-first search)."""
    found, state = [], {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


@pytest.mark.parametrize("sub", ["engine", "extensions", "solvers"])
def test_no_import_cycles(sub):
    """The modules of a layer import each other in one direction too (``engine.factors`` is pure
    tensor math: the capture reads it, never the other way)."""
    found = cycles(import_graph(PKG, sub))
    assert not found, [" -> ".join(c) for c in found]


def test_cycle_search_reports_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
