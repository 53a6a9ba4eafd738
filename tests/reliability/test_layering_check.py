"""The layering test can fail (issue 7): it skipped relative imports, so adding
``from ..engine import state`` to ``curvlib/solvers/cg.py`` kept it green.

Each case writes a small ``curvlib`` tree with one bad import into a temporary folder and runs
the checker of ``tests/test_layering.py`` on it.
"""
from pathlib import Path

import pytest

from tests import test_layering

BAD_IMPORTS = {
    "relative from-import": ("solvers/cg.py", "from ..engine import state\n"),
    "relative package import": ("solvers/cg.py", "from .. import extensions\n"),
    "absolute package import": ("solvers/cg.py", "from curvlib import engine\n"),
    "relative, in __init__": ("engine/__init__.py", "from ..optim import NaturalGradient\n"),
    "relative, nested": ("extensions/sub/deep.py", "from ...optim.base import X\n"),
    "absolute module": ("solvers/lanczos.py", "import curvlib.extensions.kfac\n"),
}


def make_tree(root: Path, rel: str, source: str) -> Path:
    pkg = root / "curvlib"
    for sub in ("", "engine", "extensions", "extensions/sub", "solvers", "optim"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    # allowed imports that must stay allowed
    (pkg / "solvers" / "lanczos.py").write_text("from ._linalg import orthogonalize\nfrom . import cg\nimport torch\n")
    (pkg / "extensions" / "kfac.py").write_text("from ..engine import state\nfrom ..solvers import cg\n")
    (pkg / "solvers" / "cg.py").write_text("from .structure import Structure\n")
    target = pkg / rel
    target.write_text(target.read_text() + source if target.exists() else source)
    return pkg


@pytest.mark.parametrize("case", sorted(BAD_IMPORTS))
def test_layering_checker_catches_bad_import(tmp_path, monkeypatch, case):
    rel, source = BAD_IMPORTS[case]
    pkg = make_tree(tmp_path, rel, source)
    layer = rel.split("/")[0]
    monkeypatch.setattr(test_layering, "PKG", pkg)
    with pytest.raises(AssertionError, match=r"imports curvlib\."):
        test_layering.test_imports_point_one_way(layer)


def test_layering_checker_accepts_allowed_imports(tmp_path, monkeypatch):
    pkg = make_tree(tmp_path, "optim/ng.py", "from ..extensions import kfac\nfrom ..solvers import cg\n")
    monkeypatch.setattr(test_layering, "PKG", pkg)
    for layer in sorted(test_layering.FORBIDDEN):
        test_layering.test_imports_point_one_way(layer)
