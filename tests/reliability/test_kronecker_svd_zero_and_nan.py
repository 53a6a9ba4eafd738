"""Kronecker-SVD curvatures (``kfac-corrected``, ``kpsvd``, ``deflation``, ``lanczos``) on zero
curvature and on a one-sample type-2 batch (a valid input: zero terms, not a solver error), and
on NaN input with every fisher_type (the engine's ``FloatingPointError``, which the README's
skip-the-batch loop catches, not the solver's ``ValueError``)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import ExactBlockFisher, KFACCorrected
from curvlib.optim import NaturalGradient

pytestmark = pytest.mark.usefixtures("float64")

KSVD = ["kfac-corrected", "kpsvd", "deflation", "lanczos"]


def _model():
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))), extend(nn.CrossEntropyLoss())


@pytest.mark.parametrize("curv", KSVD)
@pytest.mark.parametrize("case", ["one-sample", "zero"])
def test_zero_or_rank_one_curvature_is_a_valid_step(curv, case):
    model, loss_fn = _model()
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=curv, fisher_type="type-2", damping=1e-2,
                          damping_mode="exact", seed=0)
    n = 1 if case == "one-sample" else 4
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    loss = loss_fn(model(x), y) * (0.0 if case == "zero" else 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no solver warning either
        with opt.capture():
            loss.backward()
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(opt.state[p]["running"][0][0]).all()
        if case == "zero":  # zero gradient: nothing moves, the terms are zero
            torch.testing.assert_close(p.detach(), b)
            terms = opt.state[p]["running"]
            C = sum(torch.kron(*t) if len(t) == 2 else t[0] for t in terms)
            assert float(C.abs().max()) == 0
        else:
            assert not torch.equal(p.detach(), b)


def test_kfac_corrected_of_one_sample_is_the_exact_block():
    """One sample, type-2: the block is one Kronecker product; the correction term is zero."""
    model, loss_fn = _model()
    x, y = torch.randn(1, 3), torch.randint(0, 2, (1,))
    with curvature(KFACCorrected("type-2", algorithm="iterative"), ExactBlockFisher("type-2")):
        loss_fn(model(x), y).backward()
    W = model[2].weight
    (G, A), (S, R) = W.kfac_corrected
    torch.testing.assert_close(torch.kron(G, A) + torch.kron(S, R), W.block_fisher, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("curv", KSVD)
@pytest.mark.parametrize("fisher_type", ["empirical", "type-2", "mc"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises_floating_point_error_and_changes_nothing(curv, fisher_type, bad):
    model, loss_fn = _model()
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=curv, fisher_type=fisher_type, seed=0)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    x[0, 0] = bad
    before = [p.detach().clone() for p in model.parameters()]
    gen = opt.core.generator.get_state().clone()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        with opt.capture():
            loss_fn(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert torch.equal(opt.core.generator.get_state(), gen) and not opt.state
