"""CGNewton's faults and damping as NaturalGradient's: non-finite products raise
``FloatingPointError`` with the advice to lower the lr / raise the damping (GGN and Hessian,
block-diagonal and whole-network), a non-finite closure loss raises before anything moves, and
``adaptive_damping=True`` adapts the damping by Levenberg–Marquardt with the exact products."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton

pytestmark = pytest.mark.usefixtures("float64")


def _setup(**hyper):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    return model, extend(nn.CrossEntropyLoss()), CGNewton(model.parameters(), lr=0.1, seed=0, **hyper)


class _Poisoned:
    """A whole-network operator whose products are NaN."""

    def __init__(self, op):
        self.op, self.params = op, op.params

    def __call__(self, vs):
        return [t * float("nan") for t in self.op(vs)]

    def matmat(self, vs):
        return [t * float("nan") for t in self.op.matmat(vs)]


@pytest.mark.parametrize("curv", ["ggn", "hessian"])
@pytest.mark.parametrize("block_diagonal", [True, False])
def test_nonfinite_products_raise_with_the_lr_advice(curv, block_diagonal):
    model, loss_fn, opt = _setup(curvature=curv, block_diagonal=block_diagonal)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with opt.capture():
        loss_fn(model(x), y).backward()
    ext = opt.core.capture.extensions[0]
    if block_diagonal:
        for p in model.parameters():
            f = p.__dict__[ext.savefield]
            p.__dict__[ext.savefield] = lambda v, f=f: f(v) * float("inf")
    else:
        orig = ext.operator
        ext.operator = lambda: _Poisoned(orig())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="lower the learning rate, increase damping or use adaptive_damping"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert opt.core.step == 0 and not opt.state


def test_nonfinite_closure_loss_raises_before_anything_moves():
    model, loss_fn, opt = _setup()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with opt.capture():
        loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="loss \\(closure\\) is NaN or Inf.*lower the learning rate"):
        opt.step(lambda: torch.tensor(float("inf")))
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def _quadratic(lr, block_diagonal, damping=1e-3):
    """Least squares: the GGN is the exact Hessian, so the quadratic model is exact."""
    torch.manual_seed(0)
    model = extend(nn.Linear(3, 2, bias=False))  # one block: block-diagonal is the whole system
    loss_fn = extend(nn.MSELoss())
    opt = CGNewton(model.parameters(), lr=lr, curvature="ggn", damping=damping, maxiter=50, tol=1e-12, atol=0.0,
                   block_diagonal=block_diagonal, adaptive_damping=True, damping_interval=1, seed=0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g)
    return model, loss_fn, opt, x, y


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_levenberg_marquardt_with_exact_products(block_diagonal):
    decay = (19 / 20) ** 5
    # a good step (lr 1: the Newton step of an exact quadratic): rho ~ 1, the damping shrinks
    model, loss_fn, opt, x, y = _quadratic(1.0, block_diagonal)
    with opt.capture():
        loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model(x), y))
    assert opt.core.groups[0].last_rho == pytest.approx(1.0, abs=0.05)
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-3 * decay)
    # an overshooting step (lr 2.5 on a quadratic: the loss rises): rho < 0, the damping grows
    model, loss_fn, opt, x, y = _quadratic(2.5, block_diagonal)
    with opt.capture():
        loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model(x), y))
    assert opt.core.groups[0].last_rho < 0
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-3 / decay)
    # without the closure on an adaptation step: refused before anything moves
    opt.zero_grad()
    with opt.capture():
        loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="adaptive_damping needs the loss"):
        opt.step()


def test_adaptive_damping_tames_a_diverging_relu_net():
    """ReLU MLP on unscaled inputs, lr 1, damping 1e-4: the fixed damping trains to a loss in the
    thousands (no value is ever non-finite); Levenberg–Marquardt raises the damping and recovers."""
    g = torch.Generator().manual_seed(0)
    X = 8 * torch.rand(256, 16, generator=g)
    Y = (X[:, :4].sum(1) > 16).long() + 2 * (X[:, 4:8].sum(1) > 16).long()
    final = {}
    for lm in (False, True):
        torch.manual_seed(0)
        model = extend(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
        loss_fn = extend(nn.CrossEntropyLoss())
        opt = CGNewton(model.parameters(), lr=1.0, damping=1e-4, maxiter=30, adaptive_damping=lm,
                       damping_interval=1, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                for x, y in zip(X.split(32), Y.split(32)):
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    with opt.capture():
                        loss.backward()
                    opt.step(lambda: loss_fn(model(x), y))
        final[lm] = float(loss_fn(model(X), Y))
    assert final[True] < 0.1 * final[False]
