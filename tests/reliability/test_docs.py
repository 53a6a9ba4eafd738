"""Documentation that users rely on: ``help()`` of every public extension, the docstrings of
``extend`` / ``curvature`` (their examples run), and the row count ``m`` of the Woodbury factors
that README.md states."""
from __future__ import annotations

import doctest
import inspect
import re

import pytest
import torch
from torch import nn

import curvlib
from curvlib import curvature, extend
from curvlib import extensions as E
from curvlib.extensions import GradFactors, stack_grad_factors
from curvlib.solvers import woodbury_solve
from tests.utils import dense_ggn

PUBLIC_EXTENSIONS = [
    "KFAC", "KPSVD", "KFACCorrected", "GGNMP", "HMP", "BatchGrad", "DiagGGN",
    "ExactBlockFisher", "GradFactors", "CrossKFAC",
]
SHAPE = re.compile(r"\[[^\]\[]*(,|\d|\*)[^\]\[]*\]")  # e.g. [N, *p.shape], [out, out], [12, 12]


def test_every_public_extension_is_listed():
    """A new public extension must get a docstring checked here too."""
    public = {n for n in E.__all__ if inspect.isclass(getattr(E, n)) and issubclass(getattr(E, n), E.Extension)}
    assert public - {"Extension"} == set(PUBLIC_EXTENSIONS)


@pytest.mark.parametrize("name", PUBLIC_EXTENSIONS)
def test_extension_docstring_has_savefield_shape_example(name):
    cls = getattr(E, name)
    doc = inspect.getdoc(cls) or ""
    assert cls.savefield and cls.savefield in doc, f"{name}: docstring does not name .{cls.savefield}"
    assert SHAPE.search(doc) and "shape" in doc.lower(), f"{name}: docstring gives no shape"
    assert "Example" in doc and ">>>" in doc, f"{name}: docstring has no runnable example"
    assert "scal" in doc.lower(), f"{name}: docstring does not state the scaling"
    if "fisher_type" in inspect.signature(cls.__init__).parameters or name == "HMP":
        # "mc" / "type-2" (and HMP) need an extended loss: the docstring must say so
        assert "extend" in doc and "loss" in doc, f"{name}: docstring does not say the loss must be extended"


def _run_doctests(obj, name):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(obj, name, globs={}) if t.examples]
    assert tests, f"{name}: no doctest examples"
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    return res


@pytest.mark.parametrize("name", PUBLIC_EXTENSIONS)
def test_extension_docstring_example_runs(name, capsys):
    res = _run_doctests(getattr(E, name), name)
    out = capsys.readouterr().out
    assert res.failed == 0 and res.attempted >= 5, out


@pytest.mark.parametrize("name", ["extend", "curvature"])
def test_entry_point_docstrings(name, capsys):
    obj = getattr(curvlib, name)
    doc = inspect.getdoc(obj)
    for word in ("Example", ">>>", "Args", "extend"):
        assert word in doc, f"{name}: docstring lacks {word!r}"
    res = _run_doctests(obj, name)
    assert res.failed == 0, capsys.readouterr().out


def test_doctest_runner_catches_a_wrong_example(capsys):
    """The doctest check above can fail: a wrong expected shape is reported."""

    def f():
        """
        >>> import torch
        >>> torch.zeros(2, 3).shape
        torch.Size([3, 2])
        """

    assert _run_doctests(f, "f").failed == 1
    capsys.readouterr()


# ----------------------------------------------------------------------------- m of the factors


def _factors(loss_fn, f_dim, y, fisher_type, mc_samples=1, N=6):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, f_dim)))
    loss_fn = extend(loss_fn)
    x = torch.randn(N, 5)
    with curvature(GradFactors(fisher_type, mc_samples=mc_samples)):
        loss_fn(model(x), y).backward()
    params = list(model.parameters())
    return model, loss_fn, x, params, stack_grad_factors(params, for_woodbury=True)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "loss, C, target, fisher_type, K",
    [
        (nn.CrossEntropyLoss, 3, "class", "type-2", 2),      # C - 1 (Householder square root)
        (nn.CrossEntropyLoss, 2, "class", "type-2", 1),
        (nn.MSELoss, 3, "real", "type-2", 3),                # one column per output
        (nn.BCEWithLogitsLoss, 3, "prob", "type-2", 3),
        (nn.CrossEntropyLoss, 3, "class", "mc", 4),          # mc_samples
        (nn.CrossEntropyLoss, 3, "class", "empirical", 1),
    ],
)
def test_woodbury_factor_rows_m_and_scaling(loss, C, target, fisher_type, K):
    """README, GradFactors: ``m = K N`` rows with ``K = C - 1`` for type-2 cross-entropy, and
    ``F = U^T U / m`` (type-2: the exact GGN from ``torch.func``), so ``woodbury_solve`` gives
    ``(F + l I)^-1 g``."""
    N = 6
    y = {"class": torch.randint(0, C, (N,)), "real": torch.randn(N, C), "prob": torch.rand(N, C)}[target]
    model, loss_fn, x, params, U = _factors(loss(), C, y, fisher_type, mc_samples=4, N=N)
    m = K * N
    d = sum(p.numel() for p in params)
    assert U.shape == (m, d)
    if fisher_type == "type-2":
        F = dense_ggn(model, loss_fn, x, y)
        torch.testing.assert_close(U.T @ U / m, F, rtol=1e-9, atol=1e-12)
        g = torch.randn(d)
        torch.testing.assert_close(woodbury_solve(U, g, 1e-2), torch.linalg.solve(F + 1e-2 * torch.eye(d), g))


def test_readme_states_m_for_cross_entropy():
    """The README's per-sample block asserts ``m = (classes - 1) x batch`` (it said ``classes x
    batch``); the block itself runs in tests/test_readme.py."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "m = classes x batch" not in text
    assert "assert U.shape == ((3 - 1) * 32, 115)" in text
