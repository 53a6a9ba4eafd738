"""Issue 20, items 17, 18 and 20: faults met while planning a step.

- 17: a sparse gradient in ``CGNewton`` (as in the other optimizers) is refused before CG,
  naming the parameter and the fix (trial-merge: "reshape is not implemented for sparse
  tensors" inside CG on main; the refusal without the fix on trial-merge).
- 18: with ``damping=0`` the retries of a failed inverse start from a floor (x10 / x100 / x1000
  of 0 changed nothing); with ``zero_grad(set_to_none=False)`` the warning for a layer that
  took no part in the backward says so (not "has no adapter").
- 20: running out of memory while building an inverse is re-raised at once as
  ``torch.OutOfMemoryError`` naming the parameters and the largest factor: no float64 retry,
  no larger-damping retries (trial-merge: four more attempts, then a numerical error).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient
from curvlib.optim import curvatures
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")


def backward(model, opt, x=None, y=None, scale=1.0):
    if x is None:
        x, y = data()
    loss = extend(nn.CrossEntropyLoss())(model(x), y) * scale
    with opt.capture():
        loss.backward()


@pytest.mark.parametrize("cls", [CGNewton, NaturalGradient])
def test_a_sparse_gradient_is_refused_naming_the_parameter_and_the_fix(cls):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(3, 3)))
    opt = cls(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 10, (6, 1)), data()[1]
    backward(model, opt, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 \(shape \(10, 3\)\) has a sparse gradient.*"
                                           r"sparse=False"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_zero_damping_retries_start_from_a_floor():
    """A zero diagonal curvature (the loss times 0) with damping 0: 1 / (0 + 0) fails; the
    retries use 1e-7, 1e-6, 1e-5 (the floor 1e-8 times 10, 100, 1000), and the first succeeds."""
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature="diag", damping=0.0, fisher_type="type-2", kl_clip=None)
    opt.zero_grad()
    backward(model, opt, scale=0.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"retrying with damping 1e-07 \(floor 1e-08 x10\)"):
        opt.step()
    assert opt.core.groups[0].inv_damping_used == pytest.approx(1e-7)
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b - p, torch.full_like(p, 0.1 / 1e-7))


def test_unused_branch_with_zero_gradient_is_warned_as_unused_not_as_without_adapter():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x, branch="used"):
            return getattr(self, branch)(x)

    model = extend(TwoBranches())
    opt = NaturalGradient(model.parameters(), lr=0.1)
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    with opt.capture():
        loss_fn(model(x, "unused"), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # `unused` keeps a zero gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture's own warning about the unused layer
        with opt.capture():
            loss_fn(model(x, "used"), y).backward()
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        opt.step()
    text = " ".join(str(w.message) for w in log)
    assert "took no part in this backward" in text and "set_to_none=False" in text
    assert "has no curvlib adapter" not in text


class _OOM:
    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.07 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate"),
], ids=["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_out_of_memory_while_building_an_inverse_is_reraised_at_once(monkeypatch, error, dtype):
    torch.set_default_dtype(dtype)
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="type-2")
    backward(model, opt)
    oom = _OOM(error)
    monkeypatch.setattr(curvatures.KFACKind, "inverse", oom)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "retrying" warning
        with pytest.raises(torch.OutOfMemoryError) as info:
            opt.step()
    assert oom.calls == 1
    msg = str(info.value)
    assert "out of memory while building the 'kfac' inverse of param group 0" in msg
    assert "largest factor is 5 x 5" in msg and "parameter 0 of param group 0 (shape (5, 4))" in msg
    assert info.value.__cause__ is error
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())) and opt.core.step == 0
