"""Checkpoints (weights_only load, bit-identical resume) and faults (non-finite values leave
everything unchanged; failing inverses retry)."""
import io

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient
from tests.optim.common import train_step
from tests.zoo import data, mlp

CURVES = ["kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected", "diag", "exact-ng", "exact-ng-blocks", "two-level"]


def make(curvature, fisher_type, model, **kw):
    return NaturalGradient(
        model.parameters(), lr=0.05, curvature=curvature, fisher_type=fisher_type,
        mc_samples=2 if fisher_type == "mc" else 1, damping=0.1,
        T_cov=2, T_inv=3, momentum=0.9, kl_clip=1e-2, seed=3,
        ema_decay=0.0 if curvature.startswith("exact") else 0.9, **kw,
    )


def train(model, opt, steps, start=0):
    loss_fn = extend(nn.CrossEntropyLoss())
    for k in range(start, start + steps):
        torch.manual_seed(100 + k)  # the global RNG must not matter
        x, y = data(n=8, seed=k)
        train_step(model, loss_fn, opt, x, y)


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
@pytest.mark.parametrize("curvature", CURVES)
def test_resume_is_bit_identical(curvature, fisher_type):
    if curvature == "exact-ng" and fisher_type == "type-2":
        pytest.skip("covered by exact-ng-blocks (same factors)")
    model = mlp()
    opt = make(curvature, fisher_type, model)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4, start=4)
    want = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(curvature, fisher_type, model2)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 4, start=4)
    for a, b in zip(want, model2.parameters()):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("curvature", ["kfac", "kpsvd"])
def test_resume_with_curvature_sub_batch_is_bit_identical(curvature):
    model = mlp()
    opt = make(curvature, "mc", model, curvature_batch_fraction=0.5)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4, start=4)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(curvature, "mc", model2, curvature_batch_fraction=0.5)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 4, start=4)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), model2.parameters()))


def test_callable_T_cov_is_saved_as_a_marker_and_kept_on_load():
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, T_cov=lambda k: 2, seed=0)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["T_cov"] == "<callable>"
    opt2 = NaturalGradient(model.parameters(), lr=0.1, T_cov=lambda k: 2)
    opt2.load_state_dict(sd)
    assert callable(opt2.param_groups[0]["T_cov"])
    opt3 = NaturalGradient(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="callable"):
        opt3.load_state_dict(sd)


def snapshot(model, opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return [p.detach().clone() for p in model.parameters()], buf.getvalue()


@pytest.mark.parametrize("where", ["grad", "curvature"])
@pytest.mark.parametrize("curvature", ["kfac", "diag", "exact-ng-blocks"])
def test_non_finite_step_raises_and_changes_nothing(where, curvature):
    model = mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make(curvature, "mc", model)
    train(model, opt, 3)  # step 3 is not a curvature step with T_cov=2; 4 is
    train(model, opt, 1, start=3)
    params_before, state_before = snapshot(model, opt)
    gen_before = opt.core.generator.get_state().clone()
    x, y = data(n=8, seed=4)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    if where == "grad":
        model[0].weight.grad[0, 0] = float("nan")
        match = "gradient of .*shape \\(5, 4\\)"
    else:
        field = {"kfac": "kfac", "diag": "diag_ggn", "exact-ng-blocks": "grad_factors"}[curvature]
        v = getattr(model[2].weight, field)
        (v[0] if isinstance(v, list) else v).view(-1)[0] = float("inf")
        match = "curvature of .*shape \\(3, 5\\)"
    with pytest.raises(FloatingPointError, match=match):
        opt.step()
    params_after, state_after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    assert state_before == state_after
    assert torch.equal(gen_before, opt.core.generator.get_state())
    # skip the batch and go on: the same as never having seen it
    train(model, opt, 1, start=5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failing_inverse_retries_with_larger_damping_and_says_so():
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="type-2", damping=1e-3, damping_mode="exact",
                          ema_decay=0.0)
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    G, A = model[0].weight.kfac
    G.copy_(-torch.eye(5) * 0.5)  # indefinite: kron(G, A) + 1e-3 I has negative eigenvalues
    A.copy_(torch.eye(4))
    with pytest.warns(RuntimeWarning, match="retrying"):
        opt.step()
    assert opt.core.groups[0].inv_damping_used >= 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_from_closure_raises_and_changes_nothing():
    model = mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make("kfac", "mc", model)
    train(model, opt, 2)
    params_before, state_before = snapshot(model, opt)
    x, y = data(n=8, seed=2)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    with pytest.raises(FloatingPointError, match="loss"):
        opt.step(lambda: torch.tensor(float("nan")))
    params_after, state_after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after)) and state_before == state_after
