"""HMP block products and the whole-network Hessian operator against torch.func.hessian,
BackPACK's HMP, scipy, and a CG-Newton step against a dense solve."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvlib import curvature, extend
from curvlib.engine.state import ENGINE
from curvlib.extensions.ggnmp import GGNMP
from curvlib.extensions.hmp import HMP
from tests.utils import dense_ggn, param_slices
from tests.zoo import MODELS as ALL_MODELS, setup


pytestmark = pytest.mark.usefixtures("float64")


MODELS = {k: ALL_MODELS[k] for k in ("mlp", "cnn", "res")}


def dense_hessian(model, loss_fn, x, y):
    """``[P, P]`` Hessian of ``loss_fn(model(x), y)`` in ``model.parameters()`` order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [p.shape for p in params.values()]

    def L(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        ps = {k: t.reshape(s) for k, t, s in zip(params, parts, shapes)}
        return loss_fn(functional_call(model, ps, (x,)), y)

    return hessian(L)(torch.cat([p.flatten() for p in params.values()]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_block_and_operator_equal_dense_hessian(model_name, loss_name, reduction):
    model, loss_fn, x, y = setup(model_name, loss_name, reduction)
    ext = HMP()
    loss = loss_fn(model(x), y)
    with curvature(ext):
        loss.backward()
    H = dense_hessian(model, loss_fn, x, y)
    for sl, p in zip(param_slices(model), model.parameters()):
        for B in (1, 3):
            V = torch.randn(B, *p.shape)
            torch.testing.assert_close(p.hmp(V), (V.reshape(B, -1) @ H[sl, sl]).reshape(V.shape))
    Hop = ext.operator()
    assert [id(p) for p in Hop.params] == [id(p) for p in model.parameters()]
    torch.testing.assert_close(Hop.to_dense(chunk=16), H)
    v = torch.randn(H.shape[0])
    np.testing.assert_allclose(Hop.to_scipy() @ v.numpy(), (H @ v).numpy(), rtol=1e-10, atol=1e-12)


def test_block_products_equal_backpack_hmp():
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import HMP as BPHMP

    model, loss_fn, x, y = setup("mlp", "ce")
    loss = loss_fn(model(x), y)
    with curvature(HMP()):
        loss.backward()
    bp_model = bp_extend(MODELS["mlp"][0]())
    bp_model.load_state_dict(model.state_dict())
    bp_loss = bp_extend(nn.CrossEntropyLoss())(bp_model(x), y)
    with backpack(BPHMP()):
        bp_loss.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        V = torch.randn(3, *p.shape)
        torch.testing.assert_close(p.hmp(V), q.hmp(V))


def test_loss_weight_and_kwargs_and_untouched_tape():
    """``(2 * loss).backward()`` gives 2 H; products after a new forward leave its tape intact."""

    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x, scale=1.0):
            return self.l2(torch.tanh(self.l1(x) * scale))

    model, loss_fn = extend(KwModel()), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ext = HMP()
    loss = loss_fn(model(x, scale=0.5), y)
    with curvature(ext):
        (2 * loss).backward()
    ps = {k: v.detach() for k, v in model.named_parameters()}
    Hw = hessian(lambda w: loss_fn(functional_call(model, {**ps, "l1.weight": w}, (x,), {"scale": 0.5}), y))(
        ps["l1.weight"]
    ).reshape(20, 20)
    V = torch.randn(2, 5, 4)
    # a new forward: its tape must survive HMP's own re-run of the model
    x2, y2 = torch.randn(7, 4), torch.randint(0, 3, (7,))
    loss2 = loss_fn(model(x2), y2)
    tape = set(ENGINE.tape)
    torch.testing.assert_close(model.l1.weight.hmp(V), 2 * (V.reshape(2, -1) @ Hw).reshape(V.shape))
    assert set(ENGINE.tape) == tape
    g = GGNMP()
    with curvature(g):
        loss2.backward()
    torch.testing.assert_close(g.operator().to_dense(), dense_ggn(model, loss_fn, x2, y2))


def test_cg_newton_step_matches_dense_solve():
    from curvlib.solvers import cg

    model, loss_fn, x, y = setup("mlp", "mse")
    ext = HMP()
    loss = loss_fn(model(x), y)
    with curvature(ext):
        loss.backward()
    H = ext.operator()
    damping = 1.0  # keeps H + damping I positive definite here
    grads = [p.grad.clone() for p in H.params]
    step, info = cg(lambda v: [a + damping * b for a, b in zip(H(v), v)], [-g for g in grads], tol=1e-12, atol=0)
    assert info.converged
    Hd = dense_hessian(model, loss_fn, x, y)
    assert torch.linalg.eigvalsh(Hd).min() + damping > 0
    g = torch.cat([t.flatten() for t in grads])
    ref = torch.linalg.solve(Hd + damping * torch.eye(len(g)), -g)
    torch.testing.assert_close(torch.cat([s.flatten() for s in step]), ref)


def test_errors_name_the_fix():
    model, loss_fn, x, y = setup("mlp", "ce")
    # loss not extended
    with pytest.raises(RuntimeError, match="extend"):
        loss = nn.CrossEntropyLoss()(model(x), y)
        with curvature(HMP()):
            loss.backward()
    # loss input is not the model output
    loss = loss_fn(2 * model(x), y)
    with curvature(HMP()):
        loss.backward()
    with pytest.raises(RuntimeError, match="does not reproduce"):
        model[0].weight.hmp(torch.randn(1, 5, 4))
    # non-deterministic model
    drop = extend(nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)))
    loss = loss_fn(drop(x), y)
    with curvature(HMP()):
        loss.backward()
    with pytest.raises(RuntimeError, match="eval"):
        drop[0].weight.hmp(torch.randn(1, 5, 4))
    # parameters changed after the backward
    ext = HMP()
    loss = loss_fn(model(x), y)
    with curvature(ext):
        loss.backward()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        ext.operator()([torch.zeros_like(p) for p in model.parameters()])
    with pytest.raises(RuntimeError, match="backward"):
        HMP().operator()


def test_memory_released():
    """The engine keeps nothing after the context; the extension drops its graph on release."""
    model, loss_fn, x, y = setup("mlp", "ce")
    ext = HMP()
    loss = loss_fn(model(x), y)
    with curvature(ext) as ctx:
        loss.backward()
    assert ctx.loss_calls == []
    assert not [c for c in ENGINE.tape.values() if c.root is model]
    model[0].weight.hmp(torch.randn(1, 5, 4))
    graph = ext._graph
    assert graph._grads is not None
    ext.release()
    assert graph._grads is None and ext._graph is None
