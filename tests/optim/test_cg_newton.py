"""CGNewton (docs/design.md §2): with a tight CG tolerance one step moves every parameter by
``-lr (C + λ I)^-1 g``, ``C`` the dense ``torch.func`` GGN / Hessian block or the whole-network
system (float64); negative curvature is reported; checkpoints resume; bad input changes nothing."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvlib import extend
from curvlib.optim import CGNewton
from tests.optim.common import blocks, train_step
from tests.utils import dense_ggn
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

LR = 0.5
TIGHT = dict(tol=1e-13, atol=0.0, maxiter=500)


def dense_hessian(model, loss_fn, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def f(flat):
        parts = torch.split(flat, sizes)
        ps = {n: t.reshape(p.shape) for n, t, p in zip(names, parts, params)}
        return loss_fn(functional_call(model, ps, (x,)), y)

    return hessian(f)(torch.cat([p.flatten() for p in params]))


def one_step(curvature, block_diagonal, damping, model=None, **kw):
    model = model or mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CGNewton(model.parameters(), lr=LR, curvature=curvature, damping=damping,
                   block_diagonal=block_diagonal, **dict(TIGHT, **kw))
    train_step(model, loss_fn, opt, x, y)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    deltas = [p.detach() - b for p, b in zip(model.parameters(), before)]
    for p, b in zip(model.parameters(), before):  # references at the point of the step
        p.data.copy_(b)
    return model, loss_fn, x, y, opt, grads, deltas


def expected(C, grads, damping):
    g = torch.cat([t.flatten() for t in grads])
    return -LR * torch.linalg.solve(C + damping * torch.eye(len(g)), g)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("precondition", [None, "kfac"])
def test_block_step_equals_dense(curvature, precondition):
    lam = 0.1 if curvature == "ggn" else 1.0
    model, loss_fn, x, y, opt, grads, deltas = one_step(curvature, True, lam, precondition=precondition)
    dense = dense_ggn if curvature == "ggn" else dense_hessian
    Cs = blocks(dense(model, loss_fn, x, y), model)
    for C, g, d in zip(Cs, grads, deltas):
        assert torch.linalg.eigvalsh(C + lam * torch.eye(len(C))).min() > 0  # SPD: CG applies
        torch.testing.assert_close(d.flatten(), expected(C, [g], lam), rtol=1e-9, atol=1e-12)
    assert all(opt.state[p]["cg_converged"] and not opt.state[p]["cg_negative_curvature"]
               for p in model.parameters())
    assert all(opt.state[p]["cg_iterations"] >= 1 for p in model.parameters())


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_whole_network_step_equals_dense(curvature):
    lam = 0.1 if curvature == "ggn" else 1.0
    model, loss_fn, x, y, opt, grads, deltas = one_step(curvature, False, lam)
    C = (dense_ggn if curvature == "ggn" else dense_hessian)(model, loss_fn, x, y)
    d = torch.cat([t.flatten() for t in deltas])
    torch.testing.assert_close(d, expected(C, grads, lam), rtol=1e-9, atol=1e-12)
    # one system for the network: the block-diagonal step is different
    _, _, _, _, _, _, bd = one_step(curvature, True, lam)
    assert (torch.cat([t.flatten() for t in bd]) - d).abs().max() > 1e-4
    assert len(opt.last_cg) == 1 and opt.last_cg[0]["converged"]


def test_loose_tolerance_is_cg_iterate():
    """tol / maxiter are CG's: maxiter=1 gives the first CG iterate (the Cauchy point)."""
    lam = 0.1
    model, loss_fn, x, y, opt, grads, deltas = one_step("ggn", True, lam, maxiter=1)
    for C, g, d in zip(blocks(dense_ggn(model, loss_fn, x, y), model), grads, deltas):
        A, gv = C + lam * torch.eye(len(C)), g.flatten()
        alpha = gv @ gv / (gv @ A @ gv)
        torch.testing.assert_close(d.flatten(), -LR * alpha * gv)
    assert all(opt.state[p]["cg_iterations"] == 1 for p in model.parameters())


def test_hessian_negative_curvature_is_reported():
    """λ = 0 on indefinite Hessian blocks: CG stops and says so; the step stays finite."""
    model = mlp(seed=3)
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data(n=12)
    H = blocks(dense_hessian(model, loss_fn, x, y), model)
    indefinite = [bool(torch.linalg.eigvalsh(h).min() < -1e-10) for h in H]
    assert any(indefinite)
    opt = CGNewton(model.parameters(), lr=LR, curvature="hessian", damping=0.0, **TIGHT)
    train_step(model, loss_fn, opt, x, y)
    for p, ind in zip(model.parameters(), indefinite):
        if ind:
            assert opt.state[p]["cg_negative_curvature"] and not opt.state[p]["cg_converged"]
        assert torch.isfinite(p).all()


def test_pch_step_equals_dense_pch_blocks():
    """``pch-*``: the step solves with the block that ``p.pchmp`` applies (dense by products)."""
    from curvlib import curvature
    from curvlib.extensions import PCHMP

    lam = 0.1
    model, loss_fn, x, y, opt, grads, deltas = one_step("pch-abs", True, lam)
    ext = PCHMP("abs")
    with curvature(ext):
        loss_fn(model(x), y).backward()
    for p, g, d in zip(model.parameters(), grads, deltas):
        n = p.numel()
        P = p.pchmp(torch.eye(n).reshape(n, *p.shape)).reshape(n, n)
        torch.testing.assert_close(d.flatten(), expected(P, [g], lam), rtol=1e-9, atol=1e-12)


def test_pch_needs_block_diagonal():
    with pytest.raises(ValueError, match="block_diagonal=True"):
        CGNewton(mlp().parameters(), lr=0.1, curvature="pch-clip", block_diagonal=False)


def test_state_dict_resume():
    """Two steps in one go equal one step, a checkpoint, and one step of a fresh optimizer
    (warm start from the saved direction, maxiter small enough that it matters)."""
    kw = dict(lr=LR, curvature="ggn", damping=0.1, maxiter=2, tol=1e-12, warm_start=True)
    loss_fn = extend(nn.CrossEntropyLoss())
    (x1, y1), (x2, y2) = data(seed=1), data(seed=2)
    model = mlp()
    opt = CGNewton(model.parameters(), **kw)
    train_step(model, loss_fn, opt, x1, y1)
    sd = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    train_step(model, loss_fn, opt, x2, y2)
    ref = [p.detach().clone() for p in model.parameters()]

    model2 = mlp()
    for p, q in zip(model2.parameters(), params):
        p.data.copy_(q)
    opt2 = CGNewton(model2.parameters(), **dict(kw, lr=123.0))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == LR
    train_step(model2, loss_fn, opt2, x2, y2)
    for a, b in zip(model2.parameters(), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # without the saved direction the step differs (the warm start matters)
    model3 = mlp()
    for p, q in zip(model3.parameters(), params):
        p.data.copy_(q)
    train_step(model3, loss_fn, CGNewton(model3.parameters(), **kw), x2, y2)
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(model3.parameters(), ref)) > 1e-8  # noqa


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs"])
def test_non_finite_input_raises_and_changes_nothing(curvature):
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = CGNewton(model.parameters(), lr=LR, curvature=curvature, damping=0.1, warm_start=True)
    x, y = data()
    train_step(model, loss_fn, opt, x, y)
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in model.parameters()}
    step = opt.state_dict()["curvlib"]["step"]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        train_step(model, loss_fn, opt, x_bad, y)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for p in model.parameters():
        for k, v in state[id(p)].items():
            w = opt.state[p][k]
            assert torch.equal(w, v) if torch.is_tensor(v) else w == v
    assert opt.state_dict()["curvlib"]["step"] == step
    train_step(model, loss_fn, opt, x, y)  # and it carries on


@pytest.mark.parametrize("where", ["gradient", "update"])
def test_non_finite_gradient_or_update_names_the_parameter(where):
    """The stacked finiteness checks of a step name the first offending parameter; nothing changes."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = CGNewton(model.parameters(), lr=LR, damping=0.1)
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    if where == "gradient":
        list(model.parameters())[2].grad[0, 0] = float("inf")
        match = "gradient of parameter 2 of param group 0"
    else:
        opt.param_groups[0]["lr"] = 1e308  # set on the group: an overflowing update (lr=inf is refused)
        for p in model.parameters():
            p.grad.mul_(1e10)
        match = "update of parameter 0 of param group 0"
    with pytest.raises(FloatingPointError, match=match):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert not opt.state


def test_step_without_capture_raises():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = CGNewton(model.parameters(), lr=LR)
    x, y = data()
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="opt.capture"):
        opt.step()


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="curvature"):
        CGNewton(mlp().parameters(), lr=0.1, curvature="kfac")
    with pytest.raises(ValueError, match="precondition"):
        CGNewton(mlp().parameters(), lr=0.1, precondition="diag")
    with pytest.raises(TypeError, match="unknown"):
        CGNewton(mlp().parameters(), lr=0.1, momentum=0.9)


def test_layer_without_adapter_takes_gradient_step():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    extra = nn.Parameter(torch.ones(3))
    model.register_parameter("scale", extra)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x) * self.m.scale

    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    opt = CGNewton(model.parameters(), lr=LR, damping=0.1)
    with pytest.warns(UserWarning, match="plain"):
        train_step(Wrap(model), loss_fn, opt, x, y)
    torch.testing.assert_close(extra.detach(), torch.ones(3) - LR * extra.grad)
