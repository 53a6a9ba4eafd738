"""A NaN / Inf model output under an extended loss: sampling (mc) used to fail inside
``torch.multinomial`` / ``torch.bernoulli`` with torch's own message; the engine now raises its
FloatingPointError naming the loss, and with ``check_finite=False`` (the distributed
optimizer's mode, where every rank must raise together in ``step()``) the curvature comes out
non-finite instead of raising inside one rank's backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, DiagGGN


def _loss(loss_fn):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(5, 3)
    x[0, 0] = float("nan")
    y = torch.randint(0, 4, (5,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.rand(5, 4).round()
    return model, extend(loss_fn)(model(x), y)


LOSSES = [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss(), nn.MSELoss()]


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("ext", [lambda: KFAC(fisher_type="mc"), lambda: DiagGGN(fisher_type="type-2")])
def test_nonfinite_output_raises_engine_error(loss_fn, ext):
    _, loss = _loss(loss_fn)
    with pytest.raises(FloatingPointError, match=f"{type(loss_fn).__name__}.*NaN or Inf"):
        with curvature(ext()):
            loss.backward()


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda l: type(l).__name__)
def test_nonfinite_output_poisons_curvature_without_check(loss_fn):
    model, loss = _loss(loss_fn)
    with curvature(KFAC(fisher_type="mc"), check_finite=False):
        loss.backward()
    G, A = model[0].weight.kfac
    assert not bool(torch.isfinite(G).all())
