"""``inverse_stagger`` (issue 22 item 5): a group's inverses rebuilt a portion per step from each
``T_inv`` update on (:mod:`curvlib.optim.stagger`)."""
from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient, Preconditioner
from curvlib.optim.curvatures import CURVATURES
from curvlib.optim.stagger import portions
from tests.optim.common import train_step
from tests.zoo import data

pytestmark = pytest.mark.usefixtures("float64")

T_INV, STAGGER, WARMUP = 6, 3, 2
#: the first window: the last warm-up step (``warming``: step k is in it while ``k + 1 < WARMUP``)
FIRST = WARMUP - 1


def net(seed: int = 0) -> nn.Module:
    """Four Linear layers (eight parameters of four factor sizes)."""
    torch.manual_seed(seed)
    return extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                                nn.Linear(5, 3)))


def make(model, curvature="kfac", **hyper):
    hyper = dict(dict(T_cov=2, T_inv=T_INV, curvature_warmup=WARMUP, inverse_stagger=STAGGER), **hyper)
    return NaturalGradient(model.parameters(), lr=0.1, momentum=0.9, curvature=curvature, seed=3, **hyper)


def train(model, opt, steps, start=0):
    loss_fn = extend(nn.CrossEntropyLoss())
    for k in range(start, start + steps):
        train_step(model, loss_fn, opt, *data(n=8, seed=k))


def test_portions_split_every_item_once_into_balanced_portions():
    costs = [8.0, 1.0, 4.0, 4.0, 2.0, 1.0]
    split = portions(costs, 3)
    assert sorted(i for p in split for i in p) == list(range(6))
    loads = [sum(costs[i] for i in p) for p in split]
    assert loads == sorted(loads) and max(loads) == 8.0  # the 8 alone; the cheapest portion first
    assert portions(costs, 10) == [[1], [5], [4], [2], [3], [0]]  # at most one portion per item
    assert portions([], 3) == []


def _rebuilds(monkeypatch, curvature):
    """Per step, the parameters whose inverse (eigenbasis) was rebuilt: recorded from the kind's
    class (patched on the class: a patched instance attribute would be left behind bound to the
    original and shadow later tests' patches of the class)."""
    cls, log = type(CURVATURES[curvature]), []
    if cls.stateful:
        direction = cls.direction

        def record(self, p, g, running, state, fresh, refresh, *rest):
            if refresh:
                log[-1].append(id(p))
            return direction(self, p, g, running, state, fresh, refresh, *rest)

        monkeypatch.setattr(cls, "direction", record)
    else:
        inverse = cls.inverse

        def record(self, params, *rest):
            log[-1].extend(id(p) for p in params)
            return inverse(self, params, *rest)

        monkeypatch.setattr(cls, "inverse", record)
    return log


@pytest.mark.parametrize("curvature", ["kfac", "diag", "ekfac", "eigen-adam"])
def test_every_parameter_is_rebuilt_exactly_once_per_window(monkeypatch, curvature):
    model = net()
    opt = make(model, curvature)
    log = _rebuilds(monkeypatch, curvature)
    loss_fn = extend(nn.CrossEntropyLoss())
    starts = []  # the steps that begin a T_inv window after the warm-up
    for k in range(WARMUP + 4 * T_INV):
        log.append([])
        before = opt.core.groups[0].inv_updates
        train_step(model, loss_fn, opt, *data(n=8, seed=k))
        if k >= FIRST and opt.core.groups[0].inv_updates > before:
            starts.append(k)
    assert len(starts) >= 3 and all(b - a == T_INV for a, b in zip(starts, starts[1:]))
    ids = {id(p) for p in model.parameters()}
    for s in starts[:-1]:
        window = log[s:s + T_INV]
        assert Counter(i for step in window for i in step) == Counter(ids), (s, window)
        assert all(window[j] for j in range(STAGGER)) and not any(window[STAGGER:])  # one portion per step
        assert max(len(step) for step in window) < len(ids)  # no step rebuilds them all


def test_without_staggering_every_parameter_is_rebuilt_at_the_window_start(monkeypatch):
    """The default (``inverse_stagger=1``) is unchanged: every inverse at the window's first step
    (the control of the test above)."""
    model = net()
    opt = make(model, inverse_stagger=1)
    log = _rebuilds(monkeypatch, "kfac")
    train_log = []
    loss_fn = extend(nn.CrossEntropyLoss())
    for k in range(FIRST + T_INV):
        log.append([])
        train_step(model, loss_fn, opt, *data(n=8, seed=k))
        train_log.append(len(log[-1]))
    assert train_log[FIRST:] == [8] + [0] * (T_INV - 1)


def test_the_preconditioner_staggers_too():
    """``inverse_stagger`` is a row of the running-curvature core: every optimizer on it has it."""
    model = net()
    pre = Preconditioner(model.parameters(), curvature="kfac", T_cov=2, T_inv=T_INV, curvature_warmup=WARMUP,
                         inverse_stagger=STAGGER, seed=3)
    train(model, pre, FIRST + 1)
    assert len(pre.core.groups[0].inv_pending) == STAGGER - 1


def test_a_rebuilt_portion_inverts_the_running_curvature_of_its_step():
    """At its portion's step a parameter's inverse is built from the running curvature of that
    step (``inverse_of`` is ``running``); the others keep theirs (``inverse_of`` unchanged)."""
    model = net()
    opt = make(model, T_cov=1)
    train(model, opt, FIRST)
    params = list(model.parameters())
    for k in range(FIRST, FIRST + T_INV):
        before = {p: opt.state[p]["inverse_of"] for p in params}
        pending = [list(x) for x in opt.core.groups[0].inv_pending]
        train(model, opt, 1, start=k)
        rebuilt = {i for i, p in enumerate(params) if opt.state[p]["inverse_of"] is not before[p]}
        if k == FIRST:
            first = set(range(len(params))) - {i for x in opt.core.groups[0].inv_pending for i in x}
            assert rebuilt == first
        else:
            assert rebuilt == (set(pending[0]) if pending else set())
        for i in rebuilt:
            assert opt.state[params[i]]["inverse_of"] is opt.state[params[i]]["running"]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("stop", [T_INV + 2, 2 * T_INV + 2])  # in a window of both schedules
def test_a_checkpoint_in_the_middle_of_a_window_resumes_bit_identically(curvature, stop):
    model = net()
    opt = make(model, curvature)
    train(model, opt, stop)
    assert opt.core.groups[0].inv_pending  # in the middle of a window
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, T_INV + 2, start=stop)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = net(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(model2, curvature)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, T_INV + 2, start=stop)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.detach(), b.detach())


def test_a_new_damping_in_the_middle_of_a_window_rebuilds_the_kept_inverses_with_it():
    model = net()
    opt = make(model)
    train(model, opt, FIRST + 1)
    assert opt.core.groups[0].inv_pending
    opt.param_groups[0]["damping"] = 0.5
    train(model, opt, 1, start=FIRST + 1)
    parts = opt.core.solves[0][1].parts
    assert all(P.damping == 0.5 for P in parts)
    assert all(opt.state[p]["inverse_damping"] == 0.5 for p in model.parameters())


@pytest.mark.parametrize("value, hyper", [
    (0, {}), (True, {}), (2.5, {}), ("2", {}), (T_INV + 1, {}),
    (2, {"curvature": "exact-ng"}), (2, {"curvature": "exact-ng-blocks"}), (2, {"curvature": "two-level"}),
])
def test_invalid_values_raise_naming_the_group(value, hyper):
    model = net()
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "inverse_stagger": value, **hyper}]
    with pytest.raises(ValueError, match=r"param group 1: inverse_stagger="):
        NaturalGradient(groups, lr=0.1, T_inv=T_INV, damping=0.1)


def test_a_callable_t_inv_below_the_stagger_raises_at_that_step_and_changes_nothing():
    model = net()
    opt = make(model, T_inv=lambda k: T_INV if k < FIRST + T_INV else 2)
    train(model, opt, FIRST + T_INV)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 0: inverse_stagger=3 is above T_inv=2"):
        train(model, opt, 1, start=FIRST + T_INV)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
