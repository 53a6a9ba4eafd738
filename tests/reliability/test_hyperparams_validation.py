"""Issue 20, items 2, 3, 4 and 16: every hyper-parameter is checked against the optimizer's table
at construction, in ``add_param_group`` and before each step (users and schedulers change groups
between steps); all groups are checked before any parameter moves, every error names the
optimizer, the group and the value, and a refused ``add_param_group`` adds nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, NoisyNaturalGradient, Preconditioner
from tests.optim.common import noisy_step
from tests.optim.common import zoo_step as step
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

NAN, INF = float("nan"), float("inf")




def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before, model):
    return all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


ADAM = dict(momentum_type="adam", momentum=0.9)
LM = dict(adaptive_damping=True)

#: (optimizer, group values, the value named in the error); accepted by trial-merge unless noted
BAD = [
    (NaturalGradient, dict(lr=-0.1), "lr=-0.1"),  # trial-merge: refused only in the constructor
    (NaturalGradient, dict(lr=INF), "lr=inf"),
    (NaturalGradient, dict(lr=NAN), "lr=nan"),
    (NaturalGradient, dict(momentum=1.5), "momentum=1.5"),
    (NaturalGradient, dict(momentum=-0.5), "momentum=-0.5"),
    (NaturalGradient, dict(ADAM, beta2=1.0), "beta2=1.0"),
    (NaturalGradient, dict(ADAM, beta2=1.5), "beta2=1.5"),
    (NaturalGradient, dict(ADAM, beta2=None), "beta2=None"),
    (NaturalGradient, dict(ADAM, eps=-1.0), "eps=-1.0"),
    (NaturalGradient, dict(ADAM, eps=0.0), "eps=0.0"),
    (NaturalGradient, dict(weight_decay=NAN, weight_decay_mode="decoupled"), "weight_decay=nan"),
    (NaturalGradient, dict(weight_decay=INF), "weight_decay=inf"),
    (NaturalGradient, dict(LM, min_damping=1.0, max_damping=0.1), "max_damping=0.1"),
    (NaturalGradient, dict(LM, min_damping=-1.0), "min_damping=-1.0"),
    (NaturalGradient, dict(mc_samples=1.5), "mc_samples=1.5"),
    (NaturalGradient, dict(mc_samples=0), "mc_samples=0"),
    (NaturalGradient, dict(rank=0), "rank=0"),  # kfac reads no rank
    (NaturalGradient, dict(curvature="kpsvd", rank=1.5), "rank=1.5"),
    (NaturalGradient, dict(kfac_approx="sum"), "kfac_approx='sum'"),
    (NaturalGradient, dict(T_cov="auto", T_cov_max=0), "T_cov_max=0"),
    (NaturalGradient, dict(T_cov_auto_tol=-1.0), "T_cov_auto_tol=-1.0"),
    (NaturalGradient, dict(kl_clip=INF), "kl_clip=inf"),
    (NaturalGradient, dict(coarse_damping=-1.0), "coarse_damping=-1.0"),
    (Preconditioner, dict(ema_decay=1.5), "ema_decay=1.5"),
    (Preconditioner, dict(damping=-1.0), "damping=-1.0"),
    (Preconditioner, dict(mc_samples=1.5), "mc_samples=1.5"),
    (CGNewton, dict(lr=-0.1), "lr=-0.1"),
    (CGNewton, dict(lr=INF), "lr=inf"),
    (CGNewton, dict(tol=NAN), "tol=nan"),
    (CGNewton, dict(block_diagonal="yes"), "block_diagonal='yes'"),
]


def make(cls, **kw):
    model = mlp()
    if cls is Preconditioner:
        return model, cls(model.parameters(), **kw)
    kw.setdefault("lr", 0.1)
    return model, cls(model.parameters(), **kw)


def _where(cls, gi):
    return f"curvlib.optim.{cls.__name__}: (param group {gi}: )?"


@pytest.mark.parametrize("cls, bad, named", BAD, ids=[n for _, _, n in BAD])
def test_construction_refuses_with_optimizer_group_and_value(cls, bad, named):
    with pytest.raises(ValueError, match=_where(cls, 0) + ".*" + named.replace("(", r"\(")):
        make(cls, **bad)


@pytest.mark.parametrize("cls, bad, named", BAD, ids=[n for _, _, n in BAD])
def test_a_value_set_between_steps_refuses_the_step_before_anything_moves(cls, bad, named):
    model, opt = make(cls, **{k: v for k, v in bad.items() if k in ("momentum_type", "adaptive_damping")})
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    closure = (lambda: loss_fn(model(x), y)) if bad.get("adaptive_damping") else None
    step(model, opt, closure)
    opt.param_groups[0].update(bad)
    before, k = snapshot(model), opt.core.step
    with pytest.raises(ValueError, match=f"curvlib.optim.{cls.__name__}: param group 0: .*" + named.replace("(", r"\(")):
        step(model, opt, closure)
    assert unchanged(before, model) and opt.core.step == k


def test_a_bad_second_group_refuses_the_step_before_the_first_group_moves():
    model = mlp()
    opt = NaturalGradient([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), **ADAM}], lr=0.1)
    step(model, opt)
    opt.param_groups[1]["beta2"] = None  # e.g. a scheduler or a typo between steps
    before = snapshot(model)
    with pytest.raises(ValueError, match="param group 1: beta2=None"):
        step(model, opt)
    assert unchanged(before, model)


def test_nan_lr_from_a_scheduler_is_refused_before_the_parameters_turn_nan():
    model, opt = make(NaturalGradient)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: float("nan") if k >= 1 else 1.0)
    step(model, opt)
    sched.step()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lr=nan"):
        step(model, opt)
    assert unchanged(before, model) and all(torch.isfinite(p).all() for p in model.parameters())


def test_schedulers_that_reach_zero_lr_keep_working():
    """Warm-up from 0 and cosine annealing to ``eta_min=0`` give ``lr = 0``: allowed."""
    model, opt = make(NaturalGradient)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k / 2)
    before = snapshot(model)
    step(model, opt)
    assert unchanged(before, model)
    sched.step()
    step(model, opt)
    assert not unchanged(before, model)


def test_ema_decay_and_negative_damping_set_between_steps_are_named_not_retried():
    """trial-merge: ``ema_decay=1.5`` surfaced as "non-SPD curvature ... increase damping" and
    ``damping=-1`` was retried at -10, -100 and -1000."""
    for key, value in (("ema_decay", 1.5), ("damping", -1.0)):
        model, opt = make(NaturalGradient)
        step(model, opt)
        opt.param_groups[0][key] = value
        with _no_warnings():
            with pytest.raises(ValueError, match=f"param group 0: {key}={value}"):
                step(model, opt)


class _no_warnings:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self.log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.log if "retrying" in str(w.message)], [str(w.message) for w in self.log]
        return False


@pytest.mark.parametrize("cls", [NaturalGradient, Preconditioner, CGNewton])
def test_a_refused_add_param_group_adds_nothing_and_later_steps_work(cls):
    model = mlp()
    opt = cls(model[0].parameters(), **({} if cls is Preconditioner else dict(lr=0.1)))
    with pytest.raises(ValueError, match="param group 1: damping=-1.0"):
        opt.add_param_group({"params": list(model[2].parameters()), "damping": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.core.groups) == 1
    step(model, opt)  # trial-merge: IndexError (the refused group stayed in param_groups)
    opt.add_param_group({"params": list(model[2].parameters())})  # the same parameters may be added again
    step(model, opt)


def test_a_group_refused_under_data_parallel_adds_nothing(monkeypatch):
    """A data-parallel optimizer refuses a group whose curvature cannot run data-parallel
    (checked without a process group: the check reads only ``opt.core.distributed``)."""
    model = mlp()
    opt = NaturalGradient(model[0].parameters(), lr=0.1)
    monkeypatch.setattr(opt.core, "distributed", object())
    with pytest.raises(NotImplementedError, match="param group 1: curvature='kpsvd' cannot run data-parallel"):
        opt.add_param_group({"params": list(model[2].parameters()), "curvature": "kpsvd"})
    assert len(opt.param_groups) == 1 and len(opt.core.groups) == 1


def test_noisy_natural_gradient_checks_groups_before_each_step():
    model = mlp()
    opt = NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=10, prior_precision=1.0)

    loss_fn, (x, y) = extend(torch.nn.CrossEntropyLoss()), data()
    noisy_step(model, loss_fn, opt, x, y)
    opt.param_groups[0]["lr"] = -1.0
    before = snapshot(model)
    with pytest.raises(ValueError, match="NoisyNaturalGradient: param group 0: lr=-1.0"):
        noisy_step(model, loss_fn, opt, x, y)
    assert unchanged(before, model)
