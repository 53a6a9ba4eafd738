"""Reference semantics (docs/design.md §2): with T_cov = T_inv = 1, no clipping, momentum or weight
decay and damping_mode="exact", one step moves every parameter by ``-lr (C_p + λ I)^-1 g_p``,
with ``C_p`` from an independent reference (float64)."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.optim import NaturalGradient
from tests.optim.common import blocks, dense_curvature, train_step
from tests.utils import curvlinops_blocks, param_slices
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

LR, LAM = 0.5, 0.1


def rearrange(F, d0, d1):
    """Van Loan: R[(i,k),(a,b)] = F[(i,a),(k,b)], kron(U, V) <-> vec(U) vec(V)^T."""
    return F.reshape(d0, d1, d0, d1).permute(0, 2, 1, 3).reshape(d0 * d0, d1 * d1)


def unrearrange(R, d0, d1):
    return R.reshape(d0, d0, d1, d1).permute(0, 2, 1, 3).reshape(d0 * d1, d0 * d1)


def truncated(R, rank):
    U, S, Vh = torch.linalg.svd(R)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def reference_blocks(name, model, loss_fn, x, y, fisher_type):
    """``C_p`` per parameter for the layerwise curvatures."""
    F = blocks(dense_curvature(model, loss_fn, x, y, fisher_type), model)
    out = []
    kfac = curvlinops_blocks(model, loss_fn, x, y, fisher_type=fisher_type)
    for p, Fp, Kp in zip(model.parameters(), F, kfac):
        if name == "kfac":
            out.append(Kp)
        elif name == "diag":
            out.append(torch.diag(torch.diagonal(Fp)))
        elif name == "exact-ng-blocks" or p.ndim == 1:  # the Kronecker family keeps bias blocks exact
            out.append(Fp)
        else:
            d0, d1 = p.shape
            if name == "kfac-corrected":
                R = rearrange(Kp, d0, d1) + truncated(rearrange(Fp, d0, d1) - rearrange(Kp, d0, d1), 1)
            else:
                R = truncated(rearrange(Fp, d0, d1), 1 if name == "kpsvd" else 2)
            out.append(unrearrange(R, d0, d1))
    return out


def step_deltas(name, fisher_type, **kw):
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradient(
        model.parameters(), lr=LR, curvature=name, fisher_type=fisher_type, damping=LAM,
        damping_mode="exact", T_cov=1, T_inv=1, kl_clip=None, momentum=0.0, weight_decay=0.0,
        ema_decay=0.0, **kw,
    )
    train_step(model, loss_fn, opt, x, y)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    deltas = [p.detach() - b for p, b in zip(model.parameters(), before)]
    ref = mlp()  # same initial weights for the references
    return model, ref, loss_fn, x, y, grads, deltas


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", ["kfac", "diag", "exact-ng-blocks", "kpsvd", "deflation", "lanczos", "kfac-corrected"])
def test_layerwise_step_is_damped_inverse_times_gradient(name, fisher_type):
    _, ref, loss_fn, x, y, grads, deltas = step_deltas(name, fisher_type)
    C = reference_blocks(name, ref, loss_fn, x, y, fisher_type)
    for Cp, g, d in zip(C, grads, deltas):
        want = -LR * torch.linalg.solve(Cp + LAM * torch.eye(Cp.shape[0]), g.flatten())
        torch.testing.assert_close(d.flatten(), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_exact_ng_step_solves_the_whole_network_system(fisher_type):
    _, ref, loss_fn, x, y, grads, deltas = step_deltas("exact-ng", fisher_type)
    F = dense_curvature(ref, loss_fn, x, y, fisher_type)
    g = torch.cat([t.flatten() for t in grads])
    want = -LR * torch.linalg.solve(F + LAM * torch.eye(F.shape[0]), g)
    torch.testing.assert_close(torch.cat([d.flatten() for d in deltas]), want, rtol=1e-7, atol=1e-10)


def _kron_factors(K, d0, d1):
    """``G, A`` with ``K = kron(G, A)`` (rank-1 Van Loan rearrangement), ``G`` with positive trace."""
    U, S, Vh = torch.linalg.svd(rearrange(K, d0, d1))
    G, A = (U[:, 0] * S[0]).reshape(d0, d0), Vh[0].reshape(d1, d1)
    return (G, A) if torch.trace(G) > 0 else (-G, -A)


def _tpselepedis_coarse(Z, nested, params, slices):
    """``(Z^T F~ Z)_ab = <Z_a, G_ij Z_b A_ij^T>`` (columns ``a``, ``b`` on parameters ``i``, ``j``)."""
    def entry(i, j):
        e = nested[i][j] if nested[i][j] is not None else [t.T for t in nested[j][i] if t is not None]
        return e[0], (e[1] if len(e) > 1 else None)

    where = [next(k for k, s in enumerate(slices) if Z[s, c].abs().sum() > 0) for c in range(Z.shape[1])]
    mat = lambda c, k: Z[slices[k], c].reshape(params[k].shape[0], -1)  # noqa: E731
    out = torch.zeros(Z.shape[1], Z.shape[1])
    for a, i in enumerate(where):
        for b, j in enumerate(where):
            G, Af = entry(i, j)
            Y = G @ mat(b, j)
            out[a, b] = ((Y if Af is None else Y @ Af.T) * mat(a, i)).sum()
    return 0.5 * (out + out.T)


def reference_two_level(space, krylov, form, ref, loss_fn, x, y, grads):
    """The two-level direction of Koroko et al. 2023 built densely: ``F`` the torch.func GGN,
    KFAC blocks from curvlinops, one coarse block per parameter."""
    F = dense_curvature(ref, loss_fn, x, y, "type-2")
    n = F.shape[0]
    A = F + LAM * torch.eye(n)
    K = curvlinops_blocks(ref, loss_fn, x, y, fisher_type="type-2")
    Pinv = [torch.linalg.inv(Kp + LAM * torch.eye(Kp.shape[0])) for Kp in K]  # damping_mode="exact"
    slices = param_slices(ref)
    g = torch.cat([t.flatten() for t in grads])
    d1 = torch.cat([Pl @ g[s] for Pl, s in zip(Pinv, slices)])
    r = g - A @ d1
    cols = []
    for Pl, s, p, Kp in zip(Pinv, slices, ref.parameters(), K):
        if space in ("nicolaides", "tpselepedis"):
            v = torch.ones(s.stop - s.start)
        elif space == "residual":
            v = Pl @ r[s]
        elif p.ndim == 1:  # spectral, bias block [G]
            v = torch.linalg.eigh(Kp)[1][:, 0]
        else:
            G, Af = _kron_factors(Kp, *p.shape)
            v = torch.kron(torch.linalg.eigh(G)[1][:, 0], torch.linalg.eigh(Af)[1][:, 0])
        z = torch.zeros(n)
        z[s] = v
        cols.append(z)
        if krylov:
            w = Pl @ v
            w = w - (w @ v) / (v @ v) * v
            if w.norm() > 1e-6 * v.norm():
                z = torch.zeros(n)
                z[s] = w
                cols.append(z)
    Z = torch.stack(cols, 1)
    if space == "tpselepedis":  # Z^T F Z from the cross-layer factors F_ij ≈ G_ij ⊗ A_ij
        cap = KFAC(fisher_type="type-2", cross_layer=True)
        with curvature(cap):
            loss_fn(ref(x), y).backward()
        A0 = _tpselepedis_coarse(Z, cap.cross.nested(), list(ref.parameters()), slices) + LAM * Z.T @ Z
    else:
        A0 = Z.T @ A @ Z
    b = g if form == "additive" else r
    return d1, Z, d1 + Z @ torch.linalg.solve(A0, Z.T @ b)


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("space", ["nicolaides", "residual", "spectral", "tpselepedis"])
def test_two_level_step_matches_its_definition(space, krylov, form):
    """One step moves by ``-lr d``, ``d = d1 + Z (Z^T A Z)^-1 Z^T b``: ``A = F + λ I`` (dense
    torch.func GGN; tpselepedis: ``Z^T F Z`` from the cross-layer Kronecker factors), ``d1`` the
    KFAC direction (curvlinops factors), ``Z`` the coarse space built densely from its definition
    (Koroko et al. 2023), ``b = g`` (additive, the default) or ``g - A d1`` (multiplicative)."""
    _, ref, loss_fn, x, y, grads, deltas = step_deltas(
        "two-level", "type-2", coarse_space=space, krylov=krylov, coarse_form=form)
    d1, Z, d = reference_two_level(space, krylov, form, ref, loss_fn, x, y, grads)
    if krylov:  # spectral: z_l is an eigenvector of P_l; the last layer's constant vectors are in the
        # softmax GGN's null space, so P_l z_l ∥ z_l there too: no Krylov vector for them
        assert Z.shape[1] == {"spectral": 4, "residual": 8}.get(space, 6)
    torch.testing.assert_close(torch.cat([t.flatten() for t in deltas]), -LR * d, rtol=1e-7, atol=1e-10)
    # and it is not the one-level direction
    assert not torch.allclose(-LR * d1, torch.cat([t.flatten() for t in deltas]), rtol=1e-4)


def test_pi_damping_uses_the_pi_heuristic():
    x, y = data()
    m2, loss2 = mlp(), extend(nn.CrossEntropyLoss())
    before = [p.detach().clone() for p in m2.parameters()]
    opt = NaturalGradient(m2.parameters(), lr=LR, curvature="kfac", fisher_type="type-2", damping=LAM, damping_mode="pi", kl_clip=None)
    train_step(m2, loss2, opt, x, y)
    W = m2[0].weight
    G, A = opt.state[W]["running"]
    pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt()
    s = LAM**0.5
    want = -LR * torch.linalg.solve(G + s / pi * torch.eye(5), W.grad) @ torch.linalg.inv(A + s * pi * torch.eye(4))
    torch.testing.assert_close(W.detach() - before[0], want)


def test_parameter_without_adapter_takes_the_plain_step():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3)))  # PReLU: no adapter
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradient(model.parameters(), lr=LR, curvature="kfac", fisher_type="type-2", damping=LAM, kl_clip=None)
    with pytest.warns(UserWarning, match="no 'kfac' curvature"):
        train_step(model, loss_fn, opt, x, y)
    ln = model[1]
    for p, b in zip(ln.parameters(), before[2:3]):
        torch.testing.assert_close(p.detach() - b, -LR * p.grad)
    assert not torch.allclose(model[0].weight.detach() - before[0], -LR * model[0].weight.grad)


@pytest.mark.parametrize("name", ["kfac", "exact-ng-blocks"])
def test_curvature_batch_fraction_uses_the_sub_batch(name):
    """``curvature_batch_fraction=0.5``: ``C`` from half the samples (mean over them), ``g`` from all."""
    model, loss_fn = mlp(), extend(nn.CrossEntropyLoss())
    x, y = data(n=8)
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradient(model.parameters(), lr=LR, curvature=name, fisher_type="type-2", damping=LAM, kl_clip=None,
                          damping_mode="exact", ema_decay=0.0, curvature_batch_fraction=0.5, seed=0)
    train_step(model, loss_fn, opt, x, y)
    idx = opt.core.capture.extensions[0].sampler.index
    assert idx.numel() == 4
    ref = mlp()
    C = reference_blocks(name, ref, loss_fn, x[idx], y[idx], "type-2")
    for Cp, p, b in zip(C, model.parameters(), before):
        want = -LR * torch.linalg.solve(Cp + LAM * torch.eye(Cp.shape[0]), p.grad.flatten())
        torch.testing.assert_close((p.detach() - b).flatten(), want)
