"""Hyper-parameters against hand-computed sequences: T_cov / T_inv counters, EMA, kl_clip,
momenta, weight decays, schedulers, param groups, Preconditioner with Adam, errors."""
import math

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient, Preconditioner
from tests.optim.common import schedule_trace, train_step
from tests.utils import dense_kron_terms
from tests.zoo import data, factor_form_net, mlp

pytestmark = pytest.mark.usefixtures("float64")


def run(steps=1, model=None, **kw):
    model = model or mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    kw.setdefault("fisher_type", "type-2")
    opt = NaturalGradient(model.parameters(), **{"lr": 0.1, **kw})
    batches = [data(seed=s + 1) for s in range(steps)]
    for x, y in batches:
        train_step(model, loss_fn, opt, x, y)
    return model, opt, loss_fn, batches


def test_T_cov_T_inv_counters_int_and_callable():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="type-2", T_cov=3, T_inv=lambda k: 2 if k < 4 else 5,
                          curvature_warmup=0)
    covs, invs = schedule_trace(model, loss_fn, opt, 12)
    assert covs == [0, 3, 6, 9]
    # inverses at 0, 2, 4 (k < 4: +2), then 4 + 5 = 9
    assert invs == [0, 2, 4, 9]


def test_no_capture_on_a_curvature_step_raises():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1)
    x, y = data()
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="opt.capture"):
        opt.step()


def test_ema_first_capture_initialises_then_mixes():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.0, fisher_type="type-2", curvature="diag", ema_decay=0.9)
    news = []
    for k in range(3):
        x, y = data(seed=k)
        train_step(model, loss_fn, opt, x, y)
        news.append(model[0].weight.diag_ggn.clone())
    want = news[0]
    for d in news[1:]:
        want = 0.9 * want + 0.1 * d
    torch.testing.assert_close(opt.state[model[0].weight]["running"], want)


def test_T_cov_auto_lengthens_while_the_curvature_is_constant():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.0, fisher_type="type-2", T_cov="auto", T_cov_max=8,
                          curvature_warmup=0)
    x, y = data()
    caps = []
    for k in range(20):
        opt.zero_grad()
        ctx = opt.capture()
        caps.append(type(ctx).__name__ == "CaptureTransaction")
        with ctx:
            loss_fn(model(x), y).backward()
        opt.step()
    # lr = 0 and one batch: the curvature never changes, the interval doubles 1, 2, 4, 8, 8
    assert [k for k, c in enumerate(caps) if c] == [0, 1, 3, 7, 15]


def directions_of(curvature="kfac", **kw):
    """One step with lr and the preconditioned direction d (from a Preconditioner with the same settings)."""
    model = mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    pre = Preconditioner(model.parameters(), curvature=curvature, fisher_type="type-2", **kw)
    x, y = data()
    loss = loss_fn(model(x), y)
    with pre.capture():
        loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    pre.step()
    return g, [p.grad.clone() for p in model.parameters()]


def test_kl_clip_scales_the_direction():
    lr, kl = 0.3, 1e-4
    g, d = directions_of()
    vg = sum(float((a * b).sum()) for a, b in zip(d, g))
    nu = min(1.0, math.sqrt(kl / (lr**2 * vg)))
    assert nu < 1
    model, opt, _, _ = run(lr=lr, kl_clip=kl)
    for p, p0, di in zip(model.parameters(), mlp().parameters(), d):
        torch.testing.assert_close(p.detach() - p0.detach(), -lr * nu * di)


def test_preconditioner_kl_clip_reads_lr_from_the_wrapped_optimizer():
    lr, kl = 0.3, 1e-4
    g, d = directions_of()
    nu = min(1.0, math.sqrt(kl / (lr**2 * sum(float((a * b).sum()) for a, b in zip(d, g)))))
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = Preconditioner(model.parameters(), optimizer=sgd, fisher_type="type-2", kl_clip=kl)
    sgd.param_groups[0]["lr"] = lr  # a scheduler changed it: the clip follows
    x, y = data()
    loss = loss_fn(model(x), y)
    with pre.capture():
        loss.backward()
    pre.step()
    for p, di in zip(model.parameters(), d):
        torch.testing.assert_close(p.grad, nu * di)
    with pytest.raises(ValueError, match="optimizer"):
        Preconditioner(model.parameters(), kl_clip=kl)


def test_heavy_ball_and_adam_momentum_sequences():
    # lr = 0 keeps the parameters (and so the directions of a fixed batch) constant
    g, d = directions_of(curvature="diag", ema_decay=0.0)
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    x, y = data()
    opt = NaturalGradient(model.parameters(), lr=0.0, curvature="diag", fisher_type="type-2", momentum=0.9, ema_decay=0.0)
    for _ in range(3):
        train_step(model, loss_fn, opt, x, y)
    W = model[0].weight
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], (1 + 0.9 + 0.81) * d[0])
    opt = NaturalGradient(model.parameters(), lr=0.0, curvature="diag", fisher_type="type-2", momentum=0.9,
                          momentum_type="adam", beta2=0.99, ema_decay=0.0)
    for _ in range(2):
        train_step(model, loss_fn, opt, x, y)
    m = 0.9 * 0.1 * d[0] + 0.1 * d[0]
    v = 0.99 * 0.01 * d[0] ** 2 + 0.01 * d[0] ** 2
    torch.testing.assert_close(opt.state[W]["exp_avg"], m)
    torch.testing.assert_close(opt.state[W]["exp_avg_sq"], v)
    # the adam step itself: p moves by -lr m_hat / (sqrt(v_hat) + eps)
    model2 = mlp()
    opt2 = NaturalGradient(model2.parameters(), lr=0.01, curvature="diag", fisher_type="type-2", momentum=0.9,
                           momentum_type="adam", ema_decay=0.0, eps=1e-8)
    train_step(model2, loss_fn, opt2, x, y)
    W0 = mlp()[0].weight.detach()
    torch.testing.assert_close(model2[0].weight.detach() - W0, -0.01 * d[0] / (d[0].abs() + 1e-8))


def test_weight_decay_l2_and_decoupled():
    wd, lr = 0.1, 0.2
    model = mlp()
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    # L2: the direction of g + wd p; diag makes it easy: (g + wd p) / (diag + λ)
    opt = NaturalGradient(model.parameters(), lr=lr, curvature="diag", fisher_type="type-2", weight_decay=wd, damping=0.1,
                          kl_clip=None)
    p0 = model[0].weight.detach().clone()
    train_step(model, loss_fn, opt, x, y)
    D = opt.state[model[0].weight]["running"]
    torch.testing.assert_close(model[0].weight.detach() - p0, -lr * (model[0].weight.grad + wd * p0) / (D + 0.1))
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=lr, curvature="diag", fisher_type="type-2", weight_decay=wd,
                          weight_decay_mode="decoupled", damping=0.1, kl_clip=None)
    train_step(model, loss_fn, opt, x, y)
    torch.testing.assert_close(model[0].weight.detach(), p0 * (1 - lr * wd) - lr * model[0].weight.grad / (D + 0.1))


def test_lr_scheduler_and_param_groups_with_different_curvatures():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(
        [{"params": model[0].parameters(), "curvature": "diag"},
         {"params": model[2].parameters(), "curvature": None, "momentum": 0.5}],
        lr=0.1, fisher_type="type-2",
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    for k in range(2):
        before = model[2].weight.detach().clone()
        train_step(model, loss_fn, opt, x, y)
        sched.step()
    # second step of the plain group: lr 0.05, buffer 0.5 g0 + g1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert "running" in opt.state[model[0].weight] and "running" not in opt.state[model[2].weight]
    assert not hasattr(model[2].weight, "kfac")


def test_preconditioner_with_adam_trains():
    torch.manual_seed(0)
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    adam = torch.optim.Adam(model.parameters(), lr=5e-2)
    pre = Preconditioner(model.parameters(), optimizer=adam, fisher_type="mc", kl_clip=1e-2, seed=0)
    x, y = data(n=32)
    losses = []
    for _ in range(20):
        adam.zero_grad()
        loss = loss_fn(model(x), y)
        with pre.capture():
            loss.backward()
        pre.step()
        adam.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kw, match", [
    (dict(curvature="kfcc"), "unknown curvature"),
    (dict(damping_mode="tikhonov"), "damping_mode"),
    (dict(T_cov=0), "T_cov"),
    (dict(T_inv="auto"), "T_inv"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(momentum_type="nesterov"), "momentum_type"),
    (dict(weight_decay_mode="adamw"), "weight_decay_mode"),
    (dict(curvature="exact-ng", damping=0.0), "damping > 0"),
    (dict(curvature="lanczos", rank=3), "rank"),
    (dict(coarse_space="coarse"), "coarse_space"),
    (dict(fisher_type="true"), "fisher_type"),
    (dict(fisher_type="type-2", mc_samples=4), "mc_samples=4: .*applies to fisher_type=.mc. only"),
])
def test_bad_configurations_say_what_to_do(kw, match):
    with pytest.raises(ValueError, match=match):
        NaturalGradient(mlp().parameters(), lr=0.1, **kw)


def test_mc_without_extended_loss_raises_clearly():
    model = mlp()
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="mc")
    x, y = data()
    with pytest.raises(Exception, match="(?i)extend"):
        loss = nn.CrossEntropyLoss()(model(x), y)
        with opt.capture():
            loss.backward()
        opt.step()


def test_adaptive_damping_follows_rho():
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    x, y = data(n=32)
    opt = NaturalGradient(model.parameters(), lr=1.0, fisher_type="type-2", damping=1.0, adaptive_damping=True,
                          damping_interval=1, damping_decay=0.5, ema_decay=0.0, damping_mode="exact",
                          kl_clip=None)
    closure = lambda: loss_fn(model(x), y)  # noqa: E731
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    opt.step(closure)
    rho = opt.core.groups[0].last_rho
    want = 1.0 * 0.5 if rho > 0.75 else (2.0 if rho < 0.25 else 1.0)
    assert opt.param_groups[0]["damping"] == pytest.approx(want)
    # a huge step makes the quadratic model a bad predictor: damping grows
    opt.param_groups[0]["lr"] = 200.0
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    d0 = opt.param_groups[0]["damping"]
    opt.step(closure)
    assert opt.core.groups[0].last_rho < 0.25 and opt.param_groups[0]["damping"] == pytest.approx(2 * d0)


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
def test_two_level_after_a_float64_retry_of_the_inverse(monkeypatch, form):
    """When the float32 KFAC inverse fails, the optimizer rebuilds it from float64 copies and calls
    the solve with float64 gradients; the two-level coarse problem must still use the float32
    operator of the capture (it raised a dtype error in matmul at step 50 of a CNN run)."""
    import curvlib.optim.curvatures as C

    x, y = data()
    x = x.float()
    loss_fn = extend(nn.CrossEntropyLoss())

    def step(fail32):
        model = mlp().float()
        before = [p.detach().clone() for p in model.parameters()]
        opt = NaturalGradient(model.parameters(), lr=0.5, curvature="two-level", fisher_type="type-2",
                              damping=0.1, coarse_space="residual", krylov=True, coarse_form=form)
        real = C.KroneckerInverse

        def picky(terms, *a, **k):
            if fail32 and terms[0][0].dtype == torch.float32:
                raise ValueError("float32 inverse failed (test)")
            return real(terms, *a, **k)

        monkeypatch.setattr(C, "KroneckerInverse", picky)
        train_step(model, loss_fn, opt, x, y)
        monkeypatch.setattr(C, "KroneckerInverse", real)
        return [(p.detach() - b) for p, b in zip(model.parameters(), before)]

    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        retried = step(True)
    plain = step(False)
    for a, b in zip(retried, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("curv", ["kfac", "lanczos"])
@pytest.mark.parametrize("layer", ["embedding", "grouped"])
def test_adaptive_damping_rho_on_diagonal_and_block_factors(layer, curv):
    """rho = (h1 - h0) / M(Δ) with the curvature products of 1-D (Embedding) and block-form
    (grouped conv) factors, against dense Kronecker matrices. The products were ``G @ V @ A``:
    a 1-D factor broadcast into a wrong product (Embedding: silently wrong rho) and block factors
    raised a shape error."""
    model, x = factor_form_net(layer, 16)
    if curv == "lanczos" and layer == "embedding":
        pytest.skip("rank-2 KPSVD of an Embedding: covered by the grouped layer's block form")
    model, loss_fn = extend(model.double()), extend(nn.CrossEntropyLoss())
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (16,))
    lam = 0.5
    opt = NaturalGradient(model.parameters(), lr=0.5, curvature=curv, fisher_type="type-2", damping=lam,
                          adaptive_damping=True, damping_interval=1, ema_decay=0.0)
    closure = lambda: loss_fn(model(x), y)  # noqa: E731
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.step(closure)
    with torch.no_grad():
        h1 = float(closure())
    M = 0.0
    for p, p0, g in zip(params, before, grads):
        d = (p.detach() - p0).reshape(-1)
        C = dense_kron_terms(opt.state[p]["running"])
        M += float(g.reshape(-1) @ d) + 0.5 * float(d @ C @ d) + 0.5 * lam * float(d @ d)
    assert opt.core.groups[0].last_rho == pytest.approx((h1 - float(loss)) / M, rel=1e-8)
