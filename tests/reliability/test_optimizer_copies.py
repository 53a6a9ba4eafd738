"""Issue 20, item 12: ``copy.deepcopy`` and ``pickle`` of every optimizer give a working copy
(trial-merge: the copy failed at its first use, ``no attribute 'core'``), which continues exactly
as the original."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, NoisyNaturalGradient, Preconditioner
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

OPTS = {
    "NaturalGradient": lambda m: NaturalGradient(m.parameters(), lr=0.1, momentum=0.9, T_inv=2, seed=0),
    "Preconditioner": lambda m: Preconditioner(m.parameters(), fisher_type="mc", seed=0),
    "CGNewton": lambda m: CGNewton(m.parameters(), lr=0.1, warm_start=True, seed=0),
    "NoisyNaturalGradient": lambda m: NoisyNaturalGradient(m.parameters(), lr=0.1, dataset_size=10,
                                                           prior_precision=1.0, seed=0),
}


def step(model, opt):
    x, y = data()
    opt.zero_grad()
    ctx = opt.sample() if isinstance(opt, NoisyNaturalGradient) else torch.enable_grad()
    with ctx:
        loss = extend(nn.CrossEntropyLoss())(model(x), y)
        with opt.capture():
            loss.backward()
    opt.step()


def pickled(pair):
    return pickle.loads(pickle.dumps(pair))


@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(OPTS))
def test_a_copy_of_a_used_optimizer_continues_as_the_original(name, how):
    model = mlp()
    opt = OPTS[name](model)
    step(model, opt)
    model2, opt2 = how((model, opt))  # together, so that the copy holds the copied parameters
    assert opt2.core.step == opt.core.step and opt2.param_groups[0]["params"][0] is next(model2.parameters())
    step(model, opt), step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    step(model2, opt2)  # and goes on


@pytest.mark.parametrize("name", list(OPTS))
def test_a_copy_of_a_new_optimizer_works(name):
    model = mlp()
    model2, opt2 = copy.deepcopy((model, OPTS[name](model)))
    step(model2, opt2)
    assert opt2.core.step == 1


def test_preconditioner_copy_keeps_its_wrapped_optimizer():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = Preconditioner(model.parameters(), optimizer=sgd, kl_clip=1e-2)
    _, pre2 = copy.deepcopy((model, pre))
    assert isinstance(pre2.optimizer, torch.optim.SGD) and pre2.optimizer is not sgd
