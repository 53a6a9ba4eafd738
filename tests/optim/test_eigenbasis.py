"""curvature="ekfac" / "eigen-adam" (curvlib.optim.eigenbasis) and grafting (curvlib.optim.grafting)
against dense float64 references: Kronecker products of the factors' eigenvectors, per-sample
gradients from torch.func, and the definitions written out."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.optim import NaturalGradient, Preconditioner
from curvlib.optim.eigenbasis import carry_diagonal, from_basis, qr_refresh, to_basis
from tests.optim.common import train_step
from tests.utils import per_sample_grads
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

#: the schedule these references were written for: no clip, no warm-up (the defaults clip at
#: 1e-3 and capture and invert at every one of the first 10 steps)
OLD_SCHEDULE = dict(kl_clip=None, curvature_warmup=0)


def orthogonal(m, gen, batch=()):
    return torch.linalg.qr(torch.randn(*batch, m, m, generator=gen))[0].contiguous()


def dense_basis(Q):
    """The dense matrix of a basis ``[Q0, Q1]`` / ``[Q0]`` acting on ``p.flatten()``."""
    def d(Qi, n):
        if Qi.dim() == 1:
            return torch.eye(n)
        return torch.block_diag(*Qi) if Qi.dim() == 3 else Qi

    if len(Q) == 1:
        return d(Q[0], Q[0].shape[0] if Q[0].dim() == 1 else Q[0].shape[-1] * (Q[0].shape[0] if Q[0].dim() == 3 else 1))
    Q0, Q1 = Q
    if Q0.dim() == 3:  # block rows: blockdiag_b kron(Q0[b], Q1 or Q1[b])
        Q1s = Q1 if Q1.dim() == 3 else [Q1] * Q0.shape[0]
        return torch.block_diag(*[torch.kron(a.contiguous(), b.contiguous()) for a, b in zip(Q0, Q1s)])
    n0 = Q0.shape[0]
    n1 = Q1.shape[0]
    return torch.kron(d(Q0, n0).contiguous(), d(Q1, n1).contiguous())


BASES = {
    "dense": lambda g: ([orthogonal(3, g), orthogonal(4, g)], (3, 4)),
    "conv-shaped": lambda g: ([orthogonal(3, g), orthogonal(8, g)], (3, 2, 2, 2)),
    "1-D first": lambda g: ([torch.ones(5), orthogonal(4, g)], (5, 4)),
    "block rows, dense columns": lambda g: ([orthogonal(2, g, (3,)), orthogonal(4, g)], (6, 4)),
    "block both": lambda g: ([orthogonal(2, g, (3,)), orthogonal(4, g, (3,))], (6, 4)),
    "bias": lambda g: ([orthogonal(5, g)], (5,)),
    "block bias": lambda g: ([orthogonal(2, g, (3,))], (6,)),
}


@pytest.mark.parametrize("form", list(BASES))
def test_rotation_matches_the_dense_kronecker_basis(form):
    gen = torch.Generator().manual_seed(0)
    Q, shape = BASES[form](gen)
    g = torch.randn(shape, generator=gen)
    Qd = dense_basis(Q)
    Y = to_basis(Q, g)
    assert torch.allclose(Y.flatten(), Qd.T @ g.flatten(), atol=1e-12)
    assert torch.allclose(from_basis(Q, Y, shape), g, atol=1e-12)
    # carrying a diagonal into another basis: the diagonal of the same matrix there
    Qn, _ = BASES[form](gen)
    S = torch.rand(Y.shape, generator=gen)
    C = Qd @ torch.diag(S.flatten()) @ Qd.T
    Qnd = dense_basis(Qn)
    assert torch.allclose(carry_diagonal(Q, Qn, S, shape).flatten(), torch.diagonal(Qnd.T @ C @ Qnd), atol=1e-12)


def test_qr_refresh_converges_to_eigh_basis():
    """SOAP's refresh (sort by diag(Q^T F Q), one power step, QR) repeated on a fixed factor is
    subspace iteration: it reaches eigh's eigenvectors (up to signs, eigenvalues descending)."""
    gen = torch.Generator().manual_seed(0)
    m = 6
    U = orthogonal(m, gen)
    lam = 2.0 ** -torch.arange(m, dtype=torch.float64)  # ratio 1/2: converges quickly
    F = U @ torch.diag(lam) @ U.T
    Q = orthogonal(m, gen)
    for _ in range(60):
        Q, order = qr_refresh(F, Q)
    assert torch.allclose((Q.T @ U).abs(), torch.eye(m), atol=1e-8)
    # one refresh from the converged basis keeps it (sorted, up to signs)
    Q2, order = qr_refresh(F, Q)
    assert torch.equal(order, torch.arange(m)) and torch.allclose((Q2.T @ Q).abs(), torch.eye(m), atol=1e-10)
    # block form: each block on its own
    FB = torch.stack([F, U.T @ F @ U])
    QB = orthogonal(m, gen, (2,))
    for _ in range(60):
        QB, _ = qr_refresh(FB, QB)
    for b in range(2):
        Ub = torch.linalg.eigh(FB[b])[1].flip(-1)
        assert torch.allclose((QB[b].T @ Ub).abs(), torch.eye(m), atol=1e-8)


# ---------------------------------------------------------------- the optimizers against dense references


def _reference_inputs(model, loss_fn, x, y):
    """This batch's empirical KFAC factors (curvlib's KFAC, tested against curvlinops elsewhere)
    and dense empirical blocks ``1/N sum_n vec(g_n) vec(g_n)^T`` from torch.func."""
    with curvature(KFAC("empirical")):
        loss_fn(model(x), y).backward()
    factors = [[F.clone() for F in p.kfac] for p in model.parameters()]
    model.zero_grad()
    psg = per_sample_grads(model, loss_fn, x, y)
    blocks = [g.flatten(1).T @ g.flatten(1) / x.shape[0] for g in psg.values()]
    return factors, blocks


def _eigvecs(factors):
    return [torch.linalg.eigh(F)[1] for F in factors]


def _kron(Qs):
    out = Qs[0]
    for Q in Qs[1:]:
        out = torch.kron(out.contiguous(), Q.contiguous())
    return out


def test_ekfac_steps_match_dense_reference():
    """Four steps with T_cov=1, T_inv=2, ema_decay=0.5: running factors, S measured in the held
    eigenbasis and mixed, the basis refreshed to eigh of the running factors (S carried as the
    diagonal of its matrix there), and the step ``-lr Q diag(1/(S + λ)) Q^T g``."""
    lr, lam, beta = 0.7, 0.05, 0.5
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=lr, curvature="ekfac", fisher_type="empirical", damping=lam,
                          T_cov=1, T_inv=2, ema_decay=beta, seed=0, **OLD_SCHEDULE)
    run, Q, S = None, None, None
    for k in range(4):
        x, y = data(seed=k + 1)
        factors, F = _reference_inputs(model, loss_fn, x, y)
        if k == 0:
            run = factors
            Q = [_kron(_eigvecs(f)) for f in factors]
            S = [torch.diagonal(q.T @ f @ q) for q, f in zip(Q, F)]
        else:
            run = [[beta * a + (1 - beta) * b for a, b in zip(r, f)] for r, f in zip(run, factors)]
            S = [beta * s + (1 - beta) * torch.diagonal(q.T @ f @ q) for s, q, f in zip(S, Q, F)]
        if k % 2 == 0:
            Qn = [_kron(_eigvecs(r)) for r in run]
            S = [torch.diagonal(qn.T @ (q * s) @ q.T @ qn) for qn, q, s in zip(Qn, Q, S)]
            Q = Qn
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, loss_fn, opt, x, y)
        for p, p0, q, s in zip(model.parameters(), before, Q, S):
            d = q @ ((q.T @ p.grad.flatten()) / (s + lam))
            assert torch.allclose(p.detach().flatten(), p0.flatten() - lr * d, atol=1e-10), k


@pytest.mark.parametrize("optimizer", ["natural-gradient", "preconditioner"])
def test_eigen_adam_steps_match_dense_reference(optimizer):
    """Rotate into the eigenbasis of the first step's factors, Adam's bias-corrected moments,
    rotate back (T_inv larger than the run: no refresh)."""
    lr, (b1, b2), eps = 0.1, (0.8, 0.9), 1e-3
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    hyper = dict(curvature="eigen-adam", fisher_type="empirical", T_inv=100, adam_betas=(b1, b2), adam_eps=eps, seed=0, **OLD_SCHEDULE)
    if optimizer == "natural-gradient":
        opt = NaturalGradient(model.parameters(), lr=lr, **hyper)
    else:
        opt = Preconditioner(model.parameters(), **hyper)
    Q = m = v = None
    for k in range(4):
        x, y = data(seed=k + 1)
        factors, _ = _reference_inputs(model, loss_fn, x, y)
        if Q is None:
            Q = [_kron(_eigvecs(f)) for f in factors]
            m = [torch.zeros(q.shape[0]) for q in Q]
            v = [torch.zeros(q.shape[0]) for q in Q]
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        with opt.capture():
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        t = k + 1
        for i, (p, p0, q, g) in enumerate(zip(model.parameters(), before, Q, grads)):
            gr = q.T @ g.flatten()
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr**2
            d = q @ ((m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps))
            if optimizer == "natural-gradient":
                assert torch.allclose(p.detach().flatten(), p0.flatten() - lr * d, atol=1e-10), (k, i)
            else:  # the Preconditioner hands the direction over in p.grad
                assert torch.allclose(p.grad.flatten(), d, atol=1e-10), (k, i)
        if optimizer == "preconditioner":
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(lr * p.grad)


def test_eigen_adam_refresh_carries_both_moments():
    """At a T_inv refresh (after the cold eigh): SOAP's QR step from the held basis on the running
    factors; the first moment is carried exactly (the same vector in the new basis), the second
    as the diagonal of ``Q diag(v) Q^T`` in the new basis (SOAP's permutation of it blew the CNN
    up: module docstring); then Adam's update of both."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.01, curvature="eigen-adam", fisher_type="empirical", T_inv=2,
                          ema_decay=0.5, seed=0, **OLD_SCHEDULE)
    for k in range(2):
        train_step(model, loss_fn, opt, *data(seed=k + 1))
    p = model[0].weight
    Q, m, v = (opt.state[p][key] for key in ("eigenbasis", "eigen_exp_avg", "eigen_exp_avg_sq"))
    train_step(model, loss_fn, opt, *data(seed=3))  # step 2: T_inv is due
    run = opt.state[p]["running"]  # mixed before the refresh
    new, orders = zip(*[qr_refresh(F, Qi) for F, Qi in zip(run, Q)])
    assert all(torch.equal(a, b) for a, b in zip(new, opt.state[p]["eigenbasis"]))
    m_new = to_basis(list(new), from_basis(Q, m, p.shape))
    assert torch.allclose(from_basis(list(new), m_new, p.shape), from_basis(Q, m, p.shape), atol=1e-12)
    v_new = carry_diagonal(Q, list(new), v, p.shape)
    gr = to_basis(list(new), p.grad)
    b1, b2 = 0.9, 0.999
    assert torch.allclose(opt.state[p]["eigen_exp_avg"], b1 * m_new + (1 - b1) * gr, atol=1e-12)
    assert torch.allclose(opt.state[p]["eigen_exp_avg_sq"], b2 * v_new + (1 - b2) * gr**2, atol=1e-12)


# ---------------------------------------------------------------- grafting


@pytest.mark.parametrize("graft", ["adam", "sgd"])
def test_grafting_norms_match_their_definition(graft):
    """Per parameter: the KFAC direction times ||s|| / ||d||, s = g (sgd) or g / (sqrt(v̂) + ε)
    (adam); the parameters of a curvature=None group take s itself."""
    lr, b2, eps = 0.3, 0.9, 1e-3
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    twin = mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "curvature": None}]
    opt = NaturalGradient(groups, lr=lr, curvature="kfac", fisher_type="empirical", damping=0.1, graft=graft,
                          adam_betas=(0.5, b2), adam_eps=eps, seed=0, **OLD_SCHEDULE)
    ref = Preconditioner(twin[0].parameters(), curvature="kfac", fisher_type="empirical", damping=0.1, seed=0, **OLD_SCHEDULE)
    v = [torch.zeros_like(p) for p in model.parameters()]
    for k in range(3):
        x, y = data(seed=k + 1)
        with torch.no_grad():
            for q, p in zip(twin.parameters(), model.parameters()):
                q.copy_(p)
        twin.zero_grad()
        loss = loss_fn(twin(x), y)
        with ref.capture():
            loss.backward()
        grads = [q.grad.clone() for q in twin.parameters()]
        ref.step()  # twin[0]'s p.grad <- the KFAC direction
        dirs = [q.grad.clone() for q in twin[0].parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, loss_fn, opt, x, y)
        for i, (p, p0, g) in enumerate(zip(model.parameters(), before, grads)):
            if graft == "sgd":
                s = g
            else:
                v[i] = b2 * v[i] + (1 - b2) * g**2
                s = g / ((v[i] / (1 - b2 ** (k + 1))).sqrt() + eps)
            expected = dirs[i] * (s.norm() / dirs[i].norm()) if i < 2 else s
            assert torch.allclose(p.detach(), p0 - lr * expected, atol=1e-10), (k, i)
            assert torch.allclose(((p0 - p.detach()) / lr).norm(), s.norm(), atol=1e-10)


def test_ekfac_checkpoint_resumes_exactly():
    """state_dict (weights_only) carries the eigenbasis and S: the resumed run takes the same steps."""
    import io

    def make(model):
        return NaturalGradient(model.parameters(), lr=0.2, curvature="ekfac", fisher_type="empirical", T_cov=1,
                               T_inv=3, damping=0.05, graft="adam", seed=0, **OLD_SCHEDULE)

    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    opt = make(model)
    for k in range(2):
        train_step(model, loss_fn, opt, *data(seed=k + 1))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = mlp()
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    for k in range(2, 5):
        train_step(model, loss_fn, opt, *data(seed=k + 1))
        train_step(model2, loss_fn, opt2, *data(seed=k + 1))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(p, q, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(graft="shampoo"), "graft"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas"),
    (dict(adam_eps=0.0), "adam_eps"),
    (dict(curvature="ekfac", adaptive_damping=True), "adaptive_damping"),
])
def test_bad_settings_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        NaturalGradient(mlp().parameters(), lr=0.1, **bad)


def test_ekfac_refuses_tied_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model, loss_fn = extend(Tied()), extend(nn.MSELoss())
    x = torch.randn(5, 4)
    for name in ("ekfac", "eigen-adam"):
        opt = NaturalGradient(model.parameters(), lr=0.1, curvature=name, fisher_type="empirical")
        with pytest.raises((ValueError, NotImplementedError), match="tied"):
            train_step(model, loss_fn, opt, x, torch.randn(5, 4))


def test_ekfac_measures_only_its_groups_parameters():
    """A "kfac" group next to an "ekfac" one: EKFAC's eigenvalues are computed for the ekfac
    group's parameters only (no batch eigendecompositions for the others)."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    groups = [{"params": list(model[0].parameters()), "curvature": "ekfac"}, {"params": list(model[2].parameters())}]
    opt = NaturalGradient(groups, lr=0.1, curvature="kfac", fisher_type="empirical", seed=0)
    for k in range(2):
        train_step(model, loss_fn, opt, *data(seed=k + 1))
        assert all(hasattr(p, "ekfac") for p in model[0].parameters())
        assert not any(hasattr(p, "ekfac") for p in model[2].parameters())
