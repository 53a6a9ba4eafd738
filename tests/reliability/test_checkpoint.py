"""Activation checkpointing (``torch.utils.checkpoint``).

- ``use_reentrant=False``: the forward runs once with autograd recording, and the recomputation
  happens inside backward without new output gradients: every fisher_type is captured exactly as
  without checkpointing.
- ``use_reentrant=True``: the checkpointed segment's forward runs under ``no_grad`` and is recomputed
  inside the backward, after the engine back-propagated its ``mc`` / ``type-2`` cotangents from the
  loss: those are refused with a message naming the cause and the fix; the empirical Fisher and
  per-sample gradients (which need only the actual backward) work.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from curvlib import curvature, extend
from curvlib.engine.state import ENGINE
from curvlib.extensions import KFAC, BatchGrad

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
        self.out = nn.Linear(5, 3)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            h = self.inner(x)
        else:
            h = checkpoint(self.inner, x, use_reentrant=self.reentrant)
        return self.out(torch.tanh(h))


def capture(reentrant, fisher_type):
    torch.manual_seed(0)
    model = extend(Net(reentrant))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = extend(nn.CrossEntropyLoss())(model(x.requires_grad_(reentrant is True)), y)
    torch.manual_seed(1)
    with curvature(KFAC(fisher_type=fisher_type), BatchGrad()):
        loss.backward()
    return [t for p in model.parameters() for t in (*p.kfac, p.grad_batch, p.grad)]


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_non_reentrant_checkpoint_captures_as_without_it(fisher_type):
    for a, b in zip(capture(False, fisher_type), capture(None, fisher_type), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_reentrant_checkpoint_empirical_and_batch_grad_work():
    for a, b in zip(capture(True, "empirical"), capture(None, "empirical"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_reentrant_checkpoint_with_extra_cotangents_names_cause_and_fix(fisher_type):
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*\n?.*use_reentrant=False") as err:
        capture(True, fisher_type)
    assert "must be extended" not in str(err.value)
    assert ENGINE.active is None
