"""Issue 20, item 13: switching a group's ``curvature`` between steps (the README allows it)
starts the new curvature's running curvature at the next step (a capture for it, whatever
``T_cov``), instead of mixing two kinds' values (trial-merge: ``TypeError`` for kfac -> kpsvd /
kfac-corrected, and with ``T_cov > 1`` for kfac -> diag / exact-ng). Changing it between
``capture()`` and ``step()`` is refused clearly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient
from tests.optim.common import zoo_step as step
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")




def fresh_direction(curvature, T_cov, model_state, **kw):
    """The first step of a new optimizer with ``curvature`` from ``model_state``."""
    model = mlp()
    model.load_state_dict(model_state)
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=curvature, T_cov=T_cov, **kw)
    step(model, opt)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("T_cov", [1, 3])
@pytest.mark.parametrize("new", ["diag", "exact-ng", "kfac-corrected", "kpsvd", "lanczos", "two-level", "kfac"])
@pytest.mark.parametrize("old", ["kfac", "diag"])
def test_switching_curvature_between_steps_starts_the_new_one(old, new, T_cov):
    if old == new:
        pytest.skip("not a switch")
    kw = dict(fisher_type="type-2", ema_decay=0.0)
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=old, T_cov=T_cov, **kw)
    step(model, opt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt.param_groups[0]["curvature"] = new
    if new == "exact-ng":
        opt.param_groups[0]["ema_decay"] = 0.0
    step(model, opt)
    # the step after the switch is the first step of the new curvature (type-2: no sampling)
    expected = fresh_direction(new, T_cov, state, **kw)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)
    step(model, opt)
    assert opt.core.groups[0].running_curvature == new


def test_switching_between_capture_and_step_is_refused_and_changes_nothing():
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, T_cov=3)
    step(model, opt)
    x, y = data()
    opt.zero_grad()
    loss = extend(nn.CrossEntropyLoss())(model(x), y)
    opt.param_groups[0]["curvature"] = "diag"
    with opt.capture():  # captures diag
        loss.backward()
    opt.param_groups[0]["curvature"] = "kpsvd"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="curvature='kpsvd', but the capture of step 1 was taken for another"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
