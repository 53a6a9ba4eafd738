"""``torch.compile(model)`` with fisher types whose cotangents are back-propagated batched
(``"type-2"``, ``"mc"`` with several samples): inductor's compiled backward calls
``aten::mm.out``, which has no batching rule, so the engine falls back to one backward per
cotangent, warns once per model, and gets the same results as the eager model.

The real compilation takes 10-20 s on the shared CI cores, so it is marked slow
(``CURVLIB_SLOW=1``); the short version makes the batched backward fail with torch's own
message and checks the same fallback path."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine import context
from curvlib.extensions import GGNMP, KFAC

pytestmark = pytest.mark.usefixtures("float64")

SLOW = os.environ.get("CURVLIB_SLOW") == "1"
NO_RULE = "Batching rule not implemented for aten::mm.out; the fallback path doesn't work on out= or view ops."


def mlp():
    return extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))


def factors(model, run, x, y, ext, seed=0):
    loss_fn = extend(nn.CrossEntropyLoss())
    model.zero_grad()
    loss = loss_fn(run(x), y)
    torch.manual_seed(seed)
    with curvature(ext):
        loss.backward()
    return [t.clone() for p in model.parameters() for t in p.kfac]


def assert_same(got, ref):
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def no_batching_rule(monkeypatch):
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError(NO_RULE)
        return real(*args, **kwargs)

    monkeypatch.setattr(context.torch.autograd, "grad", grad)


@pytest.mark.parametrize("fisher_type, mc_samples", [("type-2", 1), ("mc", 3)])
def test_fallback_without_batching_rule_gives_the_batched_result(monkeypatch, fisher_type, mc_samples):
    model = mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ext = lambda: KFAC(fisher_type=fisher_type, mc_samples=mc_samples)  # noqa: E731
    ref = factors(model, model, x, y, ext())
    no_batching_rule(monkeypatch)
    with pytest.warns(UserWarning, match="one at a time"):
        got = factors(model, model, x, y, ext())
    assert_same(got, ref)
    with warnings.catch_warnings(record=True) as caught:  # remembered: warned once per model
        warnings.simplefilter("always")
        again = factors(model, model, x, y, ext())
    assert not [w for w in caught if "one at a time" in str(w.message)]
    assert_same(again, ref)


def test_batched_errors_other_than_a_missing_batching_rule_propagate(monkeypatch):
    real = torch.autograd.grad

    def broken(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("something else went wrong")
        return real(*args, **kwargs)

    monkeypatch.setattr(context.torch.autograd, "grad", broken)
    model = mlp()
    loss = extend(nn.CrossEntropyLoss())(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
    with pytest.raises(RuntimeError, match="something else"):
        with curvature(GGNMP(fisher_type="type-2")):
            loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("fisher_type, mc_samples", [("type-2", 1), ("mc", 3)])
def test_compiled_mlp_captures_like_the_eager_one(fisher_type, mc_samples):
    if not SLOW:
        pytest.skip("long run (torch.compile): set CURVLIB_SLOW=1")
    model = mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    compiled = torch.compile(model)
    ext = lambda: KFAC(fisher_type=fisher_type, mc_samples=mc_samples)  # noqa: E731
    with pytest.warns(UserWarning, match="one at a time"):
        got = factors(model, compiled, x, y, ext())
    assert_same(got, factors(model, model, x, y, ext()))
