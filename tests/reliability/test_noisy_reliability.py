"""NoisyNaturalGradient: ``step()`` inside ``sample()`` is refused; after ``load_state_dict`` the
step and the noise use one prior; a failed step restores the generator (draws of ``sample()``
included); ``predict()`` does not touch the training generator; regression scaling and the
predictive mean and spread."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NoisyNaturalGradient
from tests.optim.common import noisy_step

pytestmark = pytest.mark.usefixtures("float64")


def _setup(prior=1.0, seed=0):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=50, prior_precision=prior, seed=seed)
    return model, loss_fn, opt


def _data(k=0):
    g = torch.Generator().manual_seed(k)
    return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)


def test_step_inside_sample_is_refused_and_changes_nothing():
    model, loss_fn, opt = _setup()
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="step\\(\\) inside sample\\(\\)"):
        with opt.sample():
            with opt.capture():
                loss_fn(model(x), y).backward()
            opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert opt.core.step == 0 and not opt.state
    opt.step()  # after the block: the capture of this step is still there
    assert opt.core.step == 1


def test_load_state_dict_uses_one_prior_for_step_and_noise():
    model, loss_fn, opt = _setup(prior=1.0)
    for k in range(2):
        noisy_step(model, loss_fn, opt, *_data(k))
    sd = opt.state_dict()
    _, _, opt2 = _setup(prior=100.0)
    opt2.load_state_dict(sd)
    lam = opt2.intrinsic_damping
    assert lam == pytest.approx(1.0 / 50)  # the checkpoint's prior
    assert all(g["damping"] == lam and g["weight_decay"] == lam for g in opt2.param_groups)
    # a checkpoint without the prior (older versions): this optimizer's prior, in both places
    del sd["curvlib"]["noisy"]
    _, _, opt3 = _setup(prior=100.0)
    opt3.load_state_dict(sd)
    assert opt3.intrinsic_damping == pytest.approx(2.0)
    assert all(g["damping"] == opt3.intrinsic_damping == g["weight_decay"] for g in opt3.param_groups)


def test_failed_step_restores_the_generator_including_the_sample_draws():
    model, loss_fn, opt = _setup()
    noisy_step(model, loss_fn, opt, *_data(0))
    state = opt.core.generator.get_state().clone()
    x, y = _data(1)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        noisy_step(model, loss_fn, opt, x, y)
    assert torch.equal(opt.core.generator.get_state(), state)
    # retrying gives the run without the failure
    noisy_step(model, loss_fn, opt, *_data(2))
    model_b, loss_b, opt_b = _setup()
    noisy_step(model_b, loss_b, opt_b, *_data(0))
    noisy_step(model_b, loss_b, opt_b, *_data(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters()))


def test_predict_does_not_change_the_training_run():
    runs = []
    for validate in (False, True):
        model, loss_fn, opt = _setup()
        for k in range(3):
            noisy_step(model, loss_fn, opt, *_data(k))
            if validate:
                opt.predict(lambda x: model(x).softmax(-1), _data(9)[0], samples=3)
                opt.predictive(model, _data(9)[0], samples=2)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # an explicit generator makes predictions reproducible
    model, loss_fn, opt = _setup()
    fn = lambda x: model(x).softmax(-1)  # noqa: E731
    a = opt.predict(fn, _data(9)[0], samples=3, generator=torch.Generator().manual_seed(5))
    b = opt.predict(fn, _data(9)[0], samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_regression_noise_scaling_and_predictive_spread():
    """Bayesian linear regression with noise σ = 0.1: with the loss MSE / (2 σ²) the predictive
    std inside the data is about σ (plain MSE is σ² = 1/2: about 0.7)."""
    g = torch.Generator().manual_seed(0)
    N, sigma = 200, 0.1
    X = torch.randn(N, 2, generator=g)
    y = X @ torch.tensor([[1.0], [-1.0]]) + sigma * torch.randn(N, 1, generator=g)
    stds = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = extend(nn.Linear(2, 1, bias=False))
        loss_fn = extend(nn.MSELoss())
        opt = NoisyNaturalGradient(model.parameters(), lr=0.5, dataset_size=N, prior_precision=1.0,
                                   fisher_type="type-2", ema_decay=0.0, seed=0)
        scale = opt.gaussian_nll_scale(sigma) if scaled else 1.0
        for _ in range(25):
            noisy_step(model, loss_fn, opt, X, y, scale)
        noise = sigma if scaled else math.sqrt(0.5)
        mean, std = opt.predictive(model, X[:20], samples=100, noise_std=noise)
        assert mean.shape == std.shape == (20, 1)
        torch.testing.assert_close(mean, X[:20] @ torch.tensor([[1.0], [-1.0]]), atol=0.1, rtol=0)
        stds[scaled] = float(std.mean())
    assert stds[True] == pytest.approx(sigma, rel=0.1)
    assert stds[False] == pytest.approx(math.sqrt(0.5), rel=0.1)
    assert NoisyNaturalGradient.gaussian_nll_scale(0.5) == 2.0
    with pytest.raises(ValueError, match="noise_std"):
        NoisyNaturalGradient.gaussian_nll_scale(0.0)
    doc = NoisyNaturalGradient.__module__
    import sys
    assert "σ² = 1/2" in sys.modules[doc].__doc__ and "predictive(" in sys.modules[doc].__doc__
