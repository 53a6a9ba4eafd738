"""The optimizer core: checkpoints of earlier versions, the hyper-parameter tables (validation,
``help()``, the docs table) and the structure the core promises (no curvature names in the core,
no private imports between optimizer modules)."""
from __future__ import annotations

import ast
import io
import pathlib
import pydoc

import pytest
import torch
from torch import nn

import curvlib.optim as O
from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, NoisyNaturalGradient, Preconditioner
from curvlib.optim.curvatures import CURVATURES
from curvlib.optim.hyperparams import REQUIRED, defaults_of, markdown_table
from curvlib.optim.products import CG_CURVATURES
from curvlib.optim.running import RunningCurvatureOptimizer
from tests.optim.common import train_step
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

OPTIMIZERS = [NaturalGradient, Preconditioner, CGNewton, NoisyNaturalGradient]
OPTIM = pathlib.Path(O.__file__).parent


# ------------------------------------------------------------------ checkpoints of earlier versions


def as_earlier_version(sd):
    """``sd`` in the layout of the checkpoints saved before the core was rewritten:
    ``state[p]["curvature"]`` for the running curvature, and ``curvlib.groups`` as dicts with
    ``last_rho`` / ``last_cg`` only where they were set."""
    out = dict(sd)
    out["state"] = {i: {("curvature" if k == "running" else k): v for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if not (k in ("last_rho", "last_cg") and v is None)} for g in sd["curvlib"]["groups"]]
    out["curvlib"] = dict(sd["curvlib"], groups=groups)
    return out


def train(model, opt, steps, start=0, closure=False):
    loss_fn = extend(nn.CrossEntropyLoss())
    for k in range(start, start + steps):
        x, y = data(n=8, seed=k)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        with opt.capture():
            loss.backward()
        opt.step((lambda: loss_fn(model(x), y)) if closure else None)


@pytest.mark.parametrize("make", [
    lambda ps: NaturalGradient(ps, lr=0.05, curvature="kpsvd", momentum=0.9, T_inv=3, seed=1, adaptive_damping=True,
                               damping_interval=2, damping_mode="exact", damping=0.1),
    lambda ps: NaturalGradient(ps, lr=0.05, curvature="diag", momentum=0.5, T_cov=2, seed=1),
    lambda ps: CGNewton(ps, lr=0.1, warm_start=True, maxiter=5),
], ids=["kpsvd-lm", "diag", "cg"])
def test_checkpoint_with_earlier_key_names_resumes_bit_identically(make):
    model = mlp()
    opt = make(model.parameters())
    closure = isinstance(opt, NaturalGradient)
    train(model, opt, 4, closure=closure)
    old = as_earlier_version(opt.state_dict())
    if isinstance(opt, NaturalGradient):
        assert all("curvature" in s and "running" not in s for s in old["state"].values())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": old}, buf)
    train(model, opt, 4, start=4, closure=closure)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(model2.parameters())
    opt2.load_state_dict(ckpt["opt"])
    assert all("curvature" not in s for s in opt2.state.values())
    train(model2, opt2, 4, start=4, closure=closure)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.detach(), b.detach())


# ------------------------------------------------------------------ the tables


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_help_lists_every_hyperparameter_with_its_meaning(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for hp in cls.hyperparameters + cls.arguments:
        assert f"``{hp.name}``" in text and hp.meaning.split("`")[0][:30] in text, hp.name
    assert len(cls.hyperparameters) >= 10


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_markdown_table_has_one_row_per_hyperparameter(cls):
    rows = markdown_table(cls).strip().splitlines()
    assert rows[0] == "| name | type | default | allowed | meaning |"
    names = [r.split("|")[1].strip().split("`")[1] for r in rows[2:]]
    assert names == [hp.name for hp in cls.hyperparameters + cls.arguments]
    assert all(r.count(" | ") >= 4 for r in rows[2:])


def test_exported_defaults_are_the_tables():
    assert O.CORE_DEFAULTS == defaults_of(RunningCurvatureOptimizer.hyperparameters)
    # the Preconditioner's only other default: no KL clip (it needs the wrapped optimizer's lr)
    assert dict(O.CORE_DEFAULTS, kl_clip=None) == defaults_of(Preconditioner.hyperparameters)
    assert dict(O.CORE_DEFAULTS, **O.STEP_DEFAULTS) == defaults_of(NaturalGradient.hyperparameters)
    assert O.CG_DEFAULTS == defaults_of(CGNewton.hyperparameters)
    assert NaturalGradient.hyperparameters[0].name == "lr" and NaturalGradient.hyperparameters[0].default is REQUIRED
    opt = NaturalGradient(mlp().parameters(), lr=0.1)
    assert {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr")} == defaults_of(
        NaturalGradient.hyperparameters)
    # the curvature kinds declare their options, and the core's table holds each once
    names = [hp.name for hp in Preconditioner.hyperparameters]
    assert len(names) == len(set(names))
    for kind in CURVATURES.values():
        assert all(hp.name in names for hp in kind.options)
    assert set(CURVATURES) == set(O.CURVATURES)


@pytest.mark.parametrize("cls, kw, match", [
    (NaturalGradient, dict(beta2=None), None),  # read by "adam" only
    (NaturalGradient, dict(momentum=1.5), "momentum=1.5 must be a number in \\[0, 1\\)"),  # issue 20: enforced
    (NaturalGradient, dict(momentum=1.0, momentum_type="adam"), "momentum=1.0 must be a number in \\[0, 1\\)"),
    (NaturalGradient, dict(adaptive_damping=True, damping_decay=1.0), "damping_decay=1.0"),
    (NaturalGradient, dict(damping_decay=1.0), None),  # only with adaptive_damping
    (NaturalGradient, dict(curvature="kfac", rank=0), "rank=0: rank applies to the KPSVD curvatures only"),
    (NaturalGradient, dict(curvature="kpsvd", rank=0), "rank=0"),
    (NaturalGradient, dict(weight_decay=-1.0), "weight_decay=-1.0"),
    (NaturalGradient, dict(kl_clip=0.0), "kl_clip=0.0"),
    (Preconditioner, dict(curvature_batch_fraction=0.0), "curvature_batch_fraction"),
    (CGNewton, dict(curvature="kfac"), "curvature='kfac' must be one of"),
    (CGNewton, dict(curvature="hessian", fisher_type="mc"), "fisher_type applies to curvature='ggn' only"),
    (CGNewton, dict(curvature="pch-abs", block_diagonal=False), "block_diagonal=True"),
    (CGNewton, dict(maxiter=0), "maxiter=0 must be an int >= 1"),
])
def test_construction_checks_the_table(cls, kw, match):
    lr = {} if cls is Preconditioner else dict(lr=0.1)
    if match is None:
        cls(mlp().parameters(), **lr, **kw)
        return
    with pytest.raises(ValueError, match=f"curvlib.optim.{cls.__name__}: param group 0: .*{match}"):
        cls(mlp().parameters(), **lr, **kw)


def test_add_param_group_and_check_group_use_the_table():
    model = mlp()
    opt = NaturalGradient(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="param group 1: damping_mode='tikhonov'"):
        opt.add_param_group({"params": model[2].parameters(), "damping_mode": "tikhonov"})
    # check_group can run at any time (issue: before each step, at load_state_dict) and changes nothing
    group = opt.param_groups[0]
    group["ema_decay"] = 1.5
    before = dict(group)
    with pytest.raises(ValueError, match="param group 0: ema_decay=1.5 must be in \\[0, 1\\)"):
        opt.check_group(group, 0)
    assert group == before and opt.core.step == 0


# ------------------------------------------------------------------ structure


def _tree(name):
    return ast.parse((OPTIM / name).read_text())


@pytest.mark.parametrize("name", ["core.py", "running.py", "distributed.py", "natural_gradient.py",
                                  "preconditioner.py", "cg_newton.py"])
def test_the_core_branches_on_no_curvature_name(name):
    """Curvature-specific behaviour lives in the kinds (curvatures.py, products.py): the core and
    the optimizers compare no curvature (``group["curvature"]``, ``kind.name``) with a name."""
    assert not _name_branches(_tree(name)), name


def _is_curvature(e) -> bool:
    return (isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Constant) and e.slice.value == "curvature") or (
        isinstance(e, ast.Attribute) and e.attr == "name")


def _name_branches(tree):
    kinds = set(CURVATURES) | set(CG_CURVATURES)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = {c.value for o in operands for c in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))
                      if isinstance(c, ast.Constant)}
            if any(map(_is_curvature, operands)) and consts & kinds:
                out.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            if _is_curvature(node.func.value):
                out.append(node.lineno)
    return out


def test_optimizer_modules_import_no_private_names():
    for path in OPTIM.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curvlib.optim"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_structure_check_fails_on_a_name_branch():
    """The check above can fail: the branches main had are found."""
    for code in ('curv.name == "two-level"', 'curv.name != "diag"', 'curv.name.startswith("exact-ng")',
                 'g["curvature"].startswith("pch")', 'g["curvature"] not in ("ggn", "hessian")'):
        assert _name_branches(ast.parse(code)), code
    assert not _name_branches(ast.parse('group["precondition"] == "kfac"'))


def test_step_state_has_one_home():
    """What an optimizer keeps beyond ``param_groups`` and ``state`` is ``opt.core``."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, seed=0)
    base = set(vars(torch.optim.SGD(model.parameters(), lr=0.1)))
    train_step(model, loss_fn, opt, *data())
    assert set(vars(opt)) - base == {"core"}
    assert opt.core.step == 1 and opt.core.groups[0].cov_updates == 1 and opt.core.capture.step == 0
