"""The defaults that do not diverge (issue 22 item 4): the KL clip on by default, the curvature
warm-up's schedule, the Preconditioner's default without a clip.

The divergence they guard against (``benchmarks/kfac_divergence.py``): at initialisation the
damping is far above the curvature, so ``(C + λ I)^-1 g`` is longer than ``g``; the weights move
25-30 % per step, the layer inputs' second moments grow 10-700x within a few steps, and an inverse
from the first batch overshoots: the loss goes to 1e7 within 3-13 steps. A KL clip bounds the step.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient, Preconditioner
from tests.optim.common import schedule_trace
from tests.zoo import data, mlp

#: the settings that diverged (examples/exp_cnn.py's before the new defaults), without the clip
UNCLIPPED = dict(T_cov=5, T_inv=10, kl_clip=None, curvature_warmup=0, momentum=0.9)


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return (X - X.mean()) / X.std(), torch.tensor(y)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


def _train(steps: int, **hyper):
    """``steps`` KFAC steps of a small CNN on 8x8 digits (batch 64); the first step whose batch
    loss exceeds 1e3 or is not finite (or that raises), else ``None``, and the last batch loss."""
    X, y = _digits()
    model, loss_fn = extend(_cnn()), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), seed=0, **hyper)
    gen = torch.Generator().manual_seed(0)
    loss = None
    for k in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with opt.capture():
                    loss.backward()
                opt.step()
        except FloatingPointError:
            return k, math.nan
        if not math.isfinite(loss.item()) or loss.item() > 1e3:
            return k, loss.item()
    return None, loss.item()


@pytest.mark.parametrize("lr, damping", [(0.3, 0.1), (0.1, 0.01)])
def test_defaults_do_not_diverge_where_the_unclipped_step_does(lr, damping):
    """Damping far above the initial curvature: without the clip the loss explodes within 15
    steps; with the default settings (only lr, damping and momentum given) it decreases."""
    failed, _ = _train(15, lr=lr, damping=damping, **UNCLIPPED)
    assert failed is not None  # the cause is present in this problem
    failed, last = _train(30, lr=lr, damping=damping, momentum=0.9)
    assert failed is None and last < 1.5, (failed, last)  # from 2.3


def _first_step(**hyper):
    """The first update of the MLP (``p_1 - p_0`` per parameter) and the gradients."""
    x, y = data(n=32)
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), fisher_type="type-2", **hyper)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with opt.capture():
        loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], grads, opt


def test_default_kl_clip_bounds_the_first_step():
    """At initialisation the default clip (1e-3) is active: the update ``-lr ν d`` satisfies
    ``lr^2 ν^2 <d, g> = kl_clip``, i.e. ``<Δ, g>^2 / <d, g> = kl_clip``, whatever the lr."""
    d_neg, g, _ = _first_step(lr=1.0, kl_clip=None)  # -d
    dg = -sum(float((a * b).sum()) for a, b in zip(d_neg, g))
    moves = []
    for lr in (0.1, 1.0):
        delta, g, opt = _first_step(lr=lr)
        assert opt.param_groups[0]["kl_clip"] == 1e-3
        assert lr * lr * dg > 1e-3  # the clip binds
        delta_g = sum(float((a * b).sum()) for a, b in zip(delta, g))
        assert delta_g**2 / dg == pytest.approx(1e-3, rel=1e-3)
        moves.append(delta)
    for a, b in zip(*moves):  # the clipped step is the same for both lrs
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_curvature_warmup_captures_and_inverts_every_step_then_follows_the_intervals():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="type-2", T_cov=3, T_inv=6, curvature_warmup=4)
    caps, invs = schedule_trace(model, loss_fn, opt, 16)
    # steps 0-3 every step; from the warm-up's last step (3): captures every 3, inverses every 6
    assert caps == [0, 1, 2, 3, 6, 9, 12, 15]
    assert invs == [0, 1, 2, 3, 9, 15]


def test_curvature_warmup_inverse_is_the_newest_running_curvature():
    """During the warm-up each step's direction uses the inverse of the running curvature that
    includes that step's capture (before, the first inverse served ``T_inv`` steps)."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.0, fisher_type="type-2", kl_clip=None, curvature_warmup=3)
    for k in range(3):
        x, y = data(seed=k)
        opt.zero_grad()
        with opt.capture():
            loss_fn(model(x), y).backward()
        opt.step()
        for p in model.parameters():
            assert opt.state[p]["inverse_of"] is opt.state[p]["running"]


def test_preconditioner_has_no_default_clip_and_accepts_one_with_its_optimizer():
    model = mlp()
    pre = Preconditioner(model.parameters())  # no optimizer: no lr for a clip
    assert pre.param_groups[0]["kl_clip"] is None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = Preconditioner(model.parameters(), optimizer=sgd, kl_clip=1e-3)
    assert pre.param_groups[0]["kl_clip"] == 1e-3
