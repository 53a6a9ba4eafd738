"""extend() is idempotent, forward-only use keeps nothing, captures are freed on exit."""
import gc

import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine.state import ENGINE
from curvlib.extensions import KFAC


def test_extend_is_idempotent_and_returns_the_module():
    model = nn.Sequential(nn.Linear(3, 2))
    assert extend(model) is model
    n_hooks = len(model[0]._forward_hooks)
    assert extend(extend(model)) is model
    assert len(model[0]._forward_hooks) == n_hooks
    loss_fn = nn.MSELoss()
    assert extend(extend(loss_fn)) is loss_fn
    assert len(loss_fn._forward_hooks) == 1


def test_no_grad_forward_records_nothing_and_tape_is_freed():
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    loss_fn = extend(nn.CrossEntropyLoss())
    with torch.no_grad():
        model(torch.randn(5, 3))
    assert not [c for c in ENGINE.tape.values() if c.module in (model[0], model[2])]
    x = torch.randn(5, 3)
    loss = loss_fn(model(x), torch.randint(0, 2, (5,)))
    assert len([c for c in ENGINE.tape.values() if c.module in (model[0], model[2])]) == 2
    with curvature(KFAC(fisher_type="type-2")):
        loss.backward()
    mine = lambda: [c for c in ENGINE.tape.values() if c.module in (model[0], model[2])]
    assert not mine() and ENGINE.active is None
    # a forward without backward is dropped at the next forward of the same model
    model(x)
    model(x)
    assert len(mine()) == 2


def test_plain_backward_outside_the_context_releases_records():
    model = extend(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(5, 3)
    out = model(x)
    call = [c for c in ENGINE.tape.values() if c.module is model[0]][-1]
    out.sum().backward()
    assert call.uid not in ENGINE.tape
    assert call.input is None and call.output_edge is None  # tensors released


def test_loss_weight_scales_the_curvature():
    """(2 * loss).backward() gives the curvature of 2 * loss (cotangents scaled by sqrt 2)."""
    torch.set_default_dtype(torch.float64)
    try:
        model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        loss_fn = extend(nn.CrossEntropyLoss())
        x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
        G1 = model[0].weight.kfac[0].clone()
        with curvature(KFAC(fisher_type="type-2")):
            (2 * loss_fn(model(x), y)).backward()
        torch.testing.assert_close(model[0].weight.kfac[0], 2 * G1)
    finally:
        torch.set_default_dtype(torch.float32)


def test_forward_without_backward_is_freed_with_the_model():
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    model(torch.randn(5, 3))  # grad enabled, never back-propagated
    uids = [c.uid for c in ENGINE.tape.values() if c.module in (model[0], model[2])]
    assert len(uids) == 2
    del model
    gc.collect()
    assert not any(u in ENGINE.tape for u in uids)
