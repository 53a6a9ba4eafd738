"""float16 / bfloat16 models: every curvature of NaturalGradient (and NoisyNaturalGradient) keeps
its curvature and inverse in float32, and the direction comes back in the parameters' dtype,
close to the float32 model's."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient, NoisyNaturalGradient
from curvlib.optim.tensors import tree_leaves

CURVATURES = ["kfac", "kpsvd", "kfac-corrected", "deflation", "lanczos", "two-level", "diag", "exact-ng",
              "exact-ng-blocks"]


def _updates(dtype, make_opt, steps=2, noisy=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    model = extend(model.to(dtype))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make_opt(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)
    before = [p.detach().float().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            with opt.sample() if noisy else _null():
                loss = loss_fn(model(x), y)
                with opt.capture():
                    loss.backward()
            opt.step(lambda: loss_fn(model(x), y)) if not noisy else opt.step()
    for p in model.parameters():
        assert p.dtype == dtype
        assert all(t.dtype == torch.float32 for t in tree_leaves(opt.state[p]["running"]))
    return [p.detach().float() - b for p, b in zip(model.parameters(), before)]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("curv", CURVATURES)
def test_natural_gradient_on_low_precision_models(curv, dtype):
    def make(model):
        return NaturalGradient(model.parameters(), lr=0.1, curvature=curv, fisher_type="type-2", damping=0.1,
                               adaptive_damping=curv == "kfac", damping_interval=1, seed=0)

    low = _updates(dtype, make)
    ref = _updates(torch.float32, make)
    tol = 0.05 if dtype == torch.float16 else 0.15
    for a, b in zip(low, ref):
        assert float((a - b).norm()) <= tol * float(b.norm()) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("curv", ["kfac", "diag"])
def test_noisy_natural_gradient_on_low_precision_models(curv, dtype):
    def make(model):
        return NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=100, prior_precision=1.0,
                                    curvature=curv, fisher_type="type-2", seed=0)

    low = _updates(dtype, make, noisy=True)
    assert all(torch.isfinite(u).all() and float(u.abs().max()) > 0 for u in low)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cg_newton_kfac_preconditioner_on_low_precision_models(dtype):
    """CGNewton's ``precondition="kfac"`` inverts the factors in float32 (it raised "cholesky_cpu
    not implemented for 'Half'") and applies them to the model's dtype."""
    from curvlib.optim import CGNewton

    def run(dt):
        torch.manual_seed(0)
        model = extend(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dt))
        loss_fn = extend(nn.CrossEntropyLoss())
        opt = CGNewton(model.parameters(), lr=0.1, damping=0.1, precondition="kfac", maxiter=5)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 3, generator=g).to(dt), torch.randint(0, 3, (16,), generator=g)
        before = [p.detach().float().clone() for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with opt.capture():
                loss_fn(model(x), y).backward()
            opt.step()
        assert all(p.dtype == dt for p in model.parameters())
        return [p.detach().float() - b for p, b in zip(model.parameters(), before)]

    low, ref = run(dtype), run(torch.float32)
    tol = 0.05 if dtype == torch.float16 else 0.15
    for a, b in zip(low, ref):
        assert float((a - b).norm()) <= tol * float(b.norm()) + 1e-3
