"""Documentation that users rely on: ``help()`` of every public extension, the docstrings of
``extend`` / ``curvature`` (their examples run), and the row count ``m`` of the Woodbury factors
that docs/user_guide/extensions.md states."""
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
    "ExactBlockFisher", "GradFactors", "CrossKFAC", "PCHMP", "EKFAC",
]
SHAPE = re.compile(r"\[[^\]\[]*(,|\d|\*)[^\]\[]*\]")  # e.g. [N, *p.shape], [out, out], [12, 12]


def test_every_public_extension_is_listed():
    """A new public extension must get a docstring checked here too."""
    public = {n for n in E.__all__ if inspect.isclass(getattr(E, n)) and issubclass(getattr(E, n), E.Extension)}
    assert public - {"Extension"} == set(PUBLIC_EXTENSIONS), (
        "a public extension was added or removed: update PUBLIC_EXTENSIONS here, and give a new "
        "one a class docstring with its savefield, shapes, scaling and a >>> example"
    )


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


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)  # [N, P, C] -> [N, C, P]


N, P = 6, 4
_CASES = {
    # name: (loss, head, input shape, target maker, fisher_type, K)
    "ce-type2": (nn.CrossEntropyLoss, [], (N, 5), lambda: torch.randint(0, 3, (N,)), "type-2", 2),  # C - 1
    "ce2-type2": (nn.CrossEntropyLoss, [], (N, 5), lambda: torch.randint(0, 2, (N,)), "type-2", 1),
    "nll-type2": (nn.NLLLoss, [nn.LogSoftmax(dim=1)], (N, 5), lambda: torch.randint(0, 3, (N,)), "type-2", 3),
    "mse-type2": (nn.MSELoss, [], (N, 5), lambda: torch.randn(N, 3), "type-2", 3),  # one per output
    "bce-type2": (nn.BCEWithLogitsLoss, [], (N, 5), lambda: torch.rand(N, 3), "type-2", 3),
    "ce-positions-type2": (nn.CrossEntropyLoss, [_Transpose()], (N, P, 5), lambda: torch.randint(0, 3, (N, P)),
                           "type-2", 3 * P),  # one per (class, position)
    "mse-positions-type2": (nn.MSELoss, [], (N, P, 5), lambda: torch.randn(N, P, 3), "type-2", 3 * P),
    "ce-mc": (nn.CrossEntropyLoss, [], (N, 5), lambda: torch.randint(0, 3, (N,)), "mc", 4),  # mc_samples
    "ce-empirical": (nn.CrossEntropyLoss, [], (N, 5), lambda: torch.randint(0, 3, (N,)), "empirical", 1),
}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", list(_CASES))
def test_woodbury_factor_rows_m_and_scaling(case):
    """README, GradFactors, stack_grad_factors: ``m = K N`` rows (``K = C - 1`` for type-2
    cross-entropy on ``[N, C]``), and ``F = U^T U / m`` equal to the dense GGN (``torch.func``)
    for type-2, so that ``woodbury_solve(U, g, l) = (F + l I)^-1 g``."""
    loss, head, xshape, y, fisher_type, K = _CASES[case]
    widths = 2 if case == "ce2-type2" else 3
    model = extend(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, widths), *head))
    loss_fn = extend(loss())
    x = torch.randn(*xshape)
    y = y()
    y = y.double() if y.is_floating_point() else y
    with curvature(GradFactors(fisher_type, mc_samples=4 if fisher_type == "mc" else 1)):
        loss_fn(model(x), y).backward()
    params = list(model.parameters())
    U = stack_grad_factors(params, for_woodbury=True)
    m, d = K * N, sum(p.numel() for p in params)
    assert U.shape == (m, d)
    if fisher_type == "type-2":
        if loss is nn.NLLLoss:  # NLL is linear in the log-probabilities: the Fisher is the CE GGN of the logits
            F = dense_ggn(model[:-1], nn.CrossEntropyLoss(), x, y)
        else:
            F = dense_ggn(model, loss_fn, x, y)
        torch.testing.assert_close(U.T @ U / m, F, rtol=1e-9, atol=1e-12)
        g = torch.randn(d)
        torch.testing.assert_close(woodbury_solve(U, g, 1e-2), torch.linalg.solve(F + 1e-2 * torch.eye(d), g))


def test_docs_state_m_for_cross_entropy():
    """The per-sample block of the extensions page asserts ``m = (classes - 1) x batch`` (the
    README said ``classes x batch``); the block itself runs in tests/test_readme.py."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "user_guide" / "extensions.md").read_text()
    assert "m = classes x batch" not in text
    assert "assert U.shape == ((3 - 1) * 32, 115)" in text
