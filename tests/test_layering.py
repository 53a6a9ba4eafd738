"""Imports point one way: optim -> extensions -> engine; optim, extensions -> solvers."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "curvlib"
FORBIDDEN = {
    "engine": {"extensions", "solvers", "optim"},
    "solvers": {"engine", "extensions", "optim"},
    "extensions": {"optim"},
}


def imported_subpackages(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "curvlib" and len(parts) > 1:
                yield parts[1], node.lineno


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer):
    bad = [
        f"{path.relative_to(PKG)}:{line} imports curvlib.{sub}"
        for path in sorted((PKG / layer).rglob("*.py"))
        for sub, line in imported_subpackages(path)
        if sub in FORBIDDEN[layer]
    ]
    assert not bad, bad
