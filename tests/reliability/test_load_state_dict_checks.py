"""Issue 20, item 1: ``load_state_dict`` checks the checkpoint before it loads anything: the
optimizer class (a ``torch.optim.SGD`` state dict, a ``NaturalGradient`` one into ``CGNewton``),
the hyper-parameters (the table), and each parameter's state against the parameter (shapes, the
running curvature's structure for the group's curvature), naming the parameter. trial-merge
accepted all of these; the next step then failed after the first layer had moved."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, NoisyNaturalGradient, Preconditioner
from tests.optim.common import zoo_step as step
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")


def wide(hidden=6):
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)))




def trained(make_opt, model=None, steps=2):
    model = model or mlp()
    opt = make_opt(model)
    for _ in range(steps):
        step(model, opt)
    return model, opt


def unchanged_load(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["curvlib"]["step"] == before["curvlib"]["step"]
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()


@pytest.mark.parametrize("kw, key", [
    (dict(momentum=0.9), "momentum_buffer"),
    (dict(), "running"),  # without momentum: trial-merge failed deep in KroneckerInverse
    (dict(momentum=0.9, momentum_type="adam"), "exp_avg"),
    (dict(curvature="diag"), "running"),
    (dict(curvature="kfac-corrected", fisher_type="type-2"), "running"),
])
def test_state_of_a_model_with_other_layer_shapes_is_refused_naming_the_parameter(kw, key):
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1, **kw))
    model = wide()
    opt = NaturalGradient(model.parameters(), lr=0.1, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    unchanged_load(opt, src.state_dict(), f"load_state_dict: the checkpoint's '{key}'.* of parameter 0 of param group 0 "
                                          r"(\(shape \(6, 4\)\) )?.*another model")
    step(model, opt)  # the optimizer still works, from its own (empty) state
    assert not any(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_state_of_another_curvature_is_refused():
    """A running ``diag`` curvature loaded into a group whose checkpoint says ``kfac``."""
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1, curvature="diag"))
    sd = src.state_dict()
    sd["param_groups"][0]["curvature"] = "kfac"
    opt = NaturalGradient(mlp().parameters(), lr=0.1)
    unchanged_load(opt, sd, "'running' curvature of parameter 0 of param group 0 .* does not fit a 'kfac' curvature")


def test_a_torch_sgd_state_dict_is_refused():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(data()[0]).sum().backward()
    sgd.step()
    opt = NaturalGradient(model.parameters(), lr=0.1)
    unchanged_load(opt, sgd.state_dict(), "NaturalGradient.load_state_dict: this is not a checkpoint of a curvlib optimizer")


@pytest.mark.parametrize("src_cls, dst_cls", [
    (NaturalGradient, CGNewton), (CGNewton, NaturalGradient), (NaturalGradient, Preconditioner),
    (NaturalGradient, NoisyNaturalGradient),
])
def test_another_optimizers_checkpoint_is_refused(src_cls, dst_cls):
    def build(cls, m):
        if cls is Preconditioner:
            return cls(m.parameters())
        if cls is NoisyNaturalGradient:
            return cls(m.parameters(), lr=0.1, dataset_size=10, prior_precision=1.0)
        return cls(m.parameters(), lr=0.1)

    _, src = trained(lambda m: build(src_cls, m), steps=1)
    opt = build(dst_cls, mlp())
    unchanged_load(opt, src.state_dict(), f"saved by {src_cls.__name__}, not {dst_cls.__name__}")


def test_a_checkpoint_without_the_class_name_is_still_checked_by_its_hyperparameters():
    """Checkpoints written before the class name was saved: a NaturalGradient group fails
    CGNewton's table."""
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1), steps=1)
    sd = src.state_dict()
    del sd["curvlib"]["optimizer"]
    unchanged_load(CGNewton(mlp().parameters(), lr=0.1), sd, "CGNewton: param group 0: curvature='kfac'")


@pytest.mark.parametrize("key, value, named", [
    ("lr", -1.0, "lr=-1.0"), ("ema_decay", 1.5, "ema_decay=1.5"), ("momentum", 1.5, "momentum=1.5"),
    ("curvature", "kfca", "unknown curvature 'kfca'"),
])
def test_loaded_hyperparameters_are_validated(key, value, named):
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1), steps=1)
    sd = src.state_dict()
    sd["param_groups"][0][key] = value
    unchanged_load(NaturalGradient(mlp().parameters(), lr=0.1), sd, f"param group 0: {named}")


def test_other_numbers_of_groups_or_parameters_are_refused():
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1), steps=1)
    model = mlp()
    opt = NaturalGradient([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    unchanged_load(opt, src.state_dict(), "1 param groups, the optimizer 2")
    opt = NaturalGradient(mlp(bias=False).parameters(), lr=0.1)
    unchanged_load(opt, src.state_dict(), "param group 0 of the checkpoint has 4 parameters, the optimizer's 2")


def test_a_matching_checkpoint_still_resumes_bit_identically():
    model, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1, momentum=0.9, T_inv=2))
    model2 = copy.deepcopy(model)
    opt2 = NaturalGradient(model2.parameters(), lr=0.1, momentum=0.9, T_inv=2)
    opt2.load_state_dict(copy.deepcopy(src.state_dict()))  # state_dict() holds the live tensors (torch's)
    step(model, src), step(model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_an_older_checkpoint_without_new_hyperparameters_takes_the_defaults():
    _, src = trained(lambda m: NaturalGradient(m.parameters(), lr=0.1), steps=1)
    sd = src.state_dict()
    del sd["param_groups"][0]["coarse_form"]
    sd["curvlib"].pop("optimizer", None)
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["coarse_form"] == "additive"
    step(model, opt)
