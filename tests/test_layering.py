"""Imports point one way: optim -> extensions -> engine; optim, extensions -> solvers.

The checker resolves relative imports (``from ..engine import state`` in
``curvlib/solvers/cg.py`` is ``curvlib.engine``) against the package of the file, found by
walking up the directories that hold an ``__init__.py``, and counts ``from curvlib import
engine`` as an import of ``curvlib.engine``. ``tests/reliability/test_layering_check.py``
proves that it fails on bad imports.
"""
import ast
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

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
