"""Stale savefields: a parameter that is frozen or unused in a later capture kept its old
``p.kfac`` (issue 7, item 5). Every context now clears the savefields it owns where it
computed nothing."""
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x, head="a"):
        return getattr(self, head)(torch.tanh(self.body(x)))


def capture(model, loss_fn, x, y, *exts, **kw):
    model.zero_grad()
    with curvature(*exts):
        loss_fn(model(x, **kw), y).backward()


def setup():
    torch.manual_seed(0)
    return extend(TwoHeads()), extend(nn.CrossEntropyLoss()), torch.randn(6, 4), torch.randint(0, 3, (6,))


def test_frozen_parameter_loses_its_old_kfac():
    model, loss_fn, x, y = setup()
    capture(model, loss_fn, x, y, KFAC("type-2"))
    assert hasattr(model.body.weight, "kfac")
    model.body.weight.requires_grad_(False)
    capture(model, loss_fn, x, y, KFAC("type-2"))
    assert not hasattr(model.body.weight, "kfac")
    assert hasattr(model.body.bias, "kfac") and hasattr(model.a.weight, "kfac")


def test_unused_parameter_loses_its_old_kfac():
    model, loss_fn, x, y = setup()
    capture(model, loss_fn, x, y, KFAC("type-2"), head="b")
    assert hasattr(model.b.weight, "kfac") and not hasattr(model.a.weight, "kfac")
    capture(model, loss_fn, x, y, KFAC("type-2"), head="a")
    assert not hasattr(model.b.weight, "kfac") and not hasattr(model.b.bias, "kfac")
    assert hasattr(model.a.weight, "kfac")


def test_other_extended_model_keeps_its_savefields():
    """A capture on one model leaves the savefields of a model that took no part in it
    (two models captured in separate contexts, then used together)."""
    m1, loss_fn, x, y = setup()
    m2 = extend(nn.Linear(4, 3))
    capture(m1, loss_fn, x, y, KFAC("type-2"))
    kfac = m1.body.weight.kfac
    with curvature(KFAC("type-2")):
        loss_fn(m2(x), y).backward()
    assert hasattr(m2.weight, "kfac") and m1.body.weight.kfac is kfac


def test_savefields_of_other_extensions_are_kept():
    """Guard: a context only clears the savefields of its own extensions."""
    model, loss_fn, x, y = setup()
    capture(model, loss_fn, x, y, BatchGrad())
    capture(model, loss_fn, x, y, KFAC("type-2"))
    assert model.body.weight.grad_batch.shape == (6, 5, 4)
