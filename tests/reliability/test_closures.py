"""Issue 20, items 14 and 15: ``step(closure)``.

- Every optimizer runs the closure with autograd enabled (torch's convention): a standard torch
  closure that zeroes the gradients and calls ``backward`` works with ``NaturalGradient`` as with
  ``Preconditioner`` and ``CGNewton`` (trial-merge: NaturalGradient ran it under ``no_grad`` and
  torch raised "element 0 of tensors does not require grad").
- With ``adaptive_damping``, a closure that returns ``None`` is refused before anything moves
  (trial-merge: after the update, with a bare ``TypeError``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, Preconditioner
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")


def build(cls, model, **kw):
    return cls(model.parameters(), **kw) if cls is Preconditioner else cls(model.parameters(), lr=0.1, **kw)


@pytest.mark.parametrize("kw", [{}, dict(adaptive_damping=True, damping_interval=1)], ids=["plain", "LM"])
@pytest.mark.parametrize("cls", [NaturalGradient, Preconditioner, CGNewton])
def test_a_torch_closure_with_backward_works_and_matches_the_explicit_loop(cls, kw):
    if kw and cls is not NaturalGradient:
        pytest.skip("adaptive_damping is NaturalGradient's")
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    model, ref = mlp(), mlp()
    opt, opt_ref = build(cls, model, seed=0, **kw), build(cls, ref, seed=0, **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        with opt.capture():
            loss.backward()
        return loss

    for _ in range(2):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad  # evaluated with autograd on
        opt_ref.zero_grad()
        loss_ref = loss_fn(ref(x), y)
        with opt_ref.capture():
            loss_ref.backward()
        opt_ref.step((lambda: loss_fn(ref(x), y)) if kw else None)
        torch.testing.assert_close(loss.detach(), loss_ref.detach())
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("returned", [None, "loss", (1.0, 2.0)], ids=["None", "str", "tuple"])
def test_adaptive_damping_refuses_a_closure_without_a_loss_before_anything_moves(returned):
    x, y = data()
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, adaptive_damping=True)
    opt.zero_grad()
    gen = opt.core.generator.get_state()
    with opt.capture():
        loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="adaptive_damping .* needs closure\\(\\) to return the loss"):
        opt.step(lambda: returned)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.core.step == 0 and not opt.state and opt.param_groups[0]["damping"] == 1e-3
    assert torch.equal(opt.core.generator.get_state(), gen)


def test_a_closure_returning_a_graph_loss_gives_no_torch_warning():
    """The loss (with autograd on, it carries a graph) is read as a number without torch's
    "Converting a tensor with requires_grad=True to a scalar" warning."""
    import warnings

    x, y = data()
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, adaptive_damping=True, damping_interval=1)
    opt.zero_grad()
    with opt.capture():
        loss_fn(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt.step(lambda: loss_fn(model(x), y))
