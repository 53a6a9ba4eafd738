"""Copies of an extended model after a grad-enabled forward without backward (validation
without ``no_grad``, EMA copies): ``copy.deepcopy``, pickle, ``torch.save`` and
``state_dict`` round trips work, and the copy is itself extended and captures correctly."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC

pytestmark = pytest.mark.usefixtures("float64")


def make():
    return extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)))


def data():
    return torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))


def kfac(model, x, y):
    loss_fn = extend(nn.CrossEntropyLoss())
    model.zero_grad()
    loss = loss_fn(model(x), y)
    with curvature(KFAC(fisher_type="type-2")):
        loss.backward()
    return [t.clone() for p in model.parameters() for t in p.kfac]


def assert_same(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-14)


def pickled(model):
    return pickle.loads(pickle.dumps(model))


def saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled, saved], ids=["deepcopy", "pickle", "torch.save"])
def test_copy_after_forward_without_backward_captures_like_the_original(copier):
    model = make()
    x, y = data()
    model(x)  # grad-enabled forward, no backward: the model holds its layer calls
    twin = copier(model)
    assert twin is not model and twin[0].weight is not model[0].weight
    ref = kfac(model, x, y)  # the original still works after being copied
    assert_same(kfac(twin, x, y), ref)
    # the copy is extended by its own hooks: a second forward/backward pair on new data
    x2, y2 = data()
    assert_same(kfac(twin, x2, y2), kfac(model, x2, y2))


def test_ema_style_copy_while_the_original_has_a_pending_backward():
    model = make()
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    loss = loss_fn(model(x), y)
    ema = copy.deepcopy(model)  # copied between forward and backward
    with curvature(KFAC(fisher_type="type-2")):
        loss.backward()
    ref = [t.clone() for p in model.parameters() for t in p.kfac]
    assert_same(kfac(ema, x, y), ref)


def test_state_dict_round_trip_into_a_fresh_extended_model():
    model = make()
    x, y = data()
    model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = make()
    other.load_state_dict(torch.load(buf))
    assert_same(kfac(other, x, y), kfac(model, x, y))
