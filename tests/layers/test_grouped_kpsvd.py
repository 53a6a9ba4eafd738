"""KPSVD on grouped / depthwise (transposed) convolutions: the block form over the groups, each
group's terms the best rank-r Kronecker approximation (truncated SVD of the Van Loan
rearrangement) of that group's diagonal block of the dense torch.func GGN; through the optimizer."""
import pytest
import torch
from einops import rearrange
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KPSVD
from tests.layers import test_grouped_conv as conv
from tests.layers import test_grouped_conv_transpose as convt
from tests.optim.common import train_step
from tests.utils import dense_ggn

pytestmark = pytest.mark.usefixtures("float64")

CASES = [(conv, c) for c in conv.CASES] + [(convt, c) for c in convt.CASES]


def best_terms(block, m, n, rank):
    """Truncated SVD of the rearrangement of a [m n, m n] block: sum of the top-rank terms."""
    R = rearrange(block, "(i a) (k b) -> (i k) (a b)", i=m, a=n, k=m, b=n)
    U, S, Vh = torch.linalg.svd(R)
    return sum(S[i] * torch.kron(U[:, i].reshape(m, m), Vh[i].reshape(n, n)) for i in range(rank))


def setup(mod, case, ext_type, route, monkeypatch):
    """The extended grouped model of ``case``, data, loss and groups; ``route="solver"`` makes
    ``ext_type`` decompose every group with the matrix-free solver instead of a dense SVD."""
    d, cin, cout, B, kw = case
    model, x = mod.grouped(d, cin, cout, B, **kw)
    if route == "solver":
        monkeypatch.setattr(ext_type, "dense_entries", 0)
    return extend(model), x, torch.randint(0, 3, (mod.N,)), extend(nn.CrossEntropyLoss()), B


@pytest.mark.parametrize("route", ["dense", "solver"])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("mod,case", CASES)
def test_block_form_terms_are_the_best_per_group_approximation(mod, case, rank, route, monkeypatch):
    model, x, y, loss_fn, B = setup(mod, case, KPSVD, route, monkeypatch)
    ext = KPSVD(fisher_type="type-2", rank=rank, method="lanczos" if rank > 1 else "power", tol=1e-12, maxiter=500)
    with curvature(ext):
        loss_fn(model(x), y).backward()
    ggn = dense_ggn(model, loss_fn, x, y)
    W = model[0].weight
    m, n = W.shape[0] // B, W[0].numel()
    rank = min(rank, m * m, n * n)
    terms = W.kpsvd
    assert len(terms) == rank
    for G, A in terms:
        assert G.shape == (B, m, m) and A.shape == (B, n, n)
    for b in range(B):
        s = slice(b * m * n, (b + 1) * m * n)
        ours = sum(torch.kron(G[b], A[b]) for G, A in terms)
        torch.testing.assert_close(ours, best_terms(ggn[s, s], m, n, rank))
    G1, A1 = terms[0]  # leading term of a PSD block: both factors PSD
    assert torch.linalg.eigvalsh(G1).min() > -1e-10 and torch.linalg.eigvalsh(A1).min() > -1e-10
    if model[0].bias is not None:
        nb = model[0].bias.numel()
        o = W.numel()
        torch.testing.assert_close(model[0].bias.kpsvd[0][0], ggn[o:o + nb, o:o + nb])



@pytest.mark.parametrize("route", ["dense", "solver"])
@pytest.mark.parametrize("mod,case", CASES)
def test_kfac_corrected_block_form(mod, case, route, monkeypatch):
    """KFACCorrected on grouped layers: ``[[G, A], [S, R]]`` in the block form, ``[G, A]`` equal to
    ``p.kfac`` (KFAC's block form) and per group ``kron(S_b, R_b)`` the best Kronecker approximation
    of the group's diagonal block of the dense GGN minus ``kron(G_b, A_b)`` (it raised
    NotImplementedError)."""
    from curvlib.extensions import KFAC, KFACCorrected

    model, x, y, loss_fn, B = setup(mod, case, KFACCorrected, route, monkeypatch)
    with curvature(KFACCorrected(fisher_type="type-2", tol=1e-12, maxiter=500), KFAC(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    ggn = dense_ggn(model, loss_fn, x, y)
    W = model[0].weight
    m, n = W.shape[0] // B, W[0].numel()
    (F0, F1), (S, R) = W.kfac_corrected
    torch.testing.assert_close(F0, W.kfac[0])
    torch.testing.assert_close(F1, W.kfac[1])
    assert S.shape == (B, m, m) and R.shape == (B, n, n)
    for b in range(B):
        s = slice(b * m * n, (b + 1) * m * n)
        residual = ggn[s, s] - torch.kron(F0[b], F1[b])
        torch.testing.assert_close(torch.kron(S[b], R[b]), best_terms(residual, m, n, 1))

def test_kpsvd_optimizer_steps_on_a_depthwise_convolution():
    from curvlib.optim import NaturalGradient

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature="kpsvd", damping=1e-2)
    losses = []
    for _ in range(10):
        losses.append(train_step(model, loss_fn, opt, x, y).item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("curv", ["lanczos", "deflation"])
def test_rank2_curvatures_step_on_grouped_layers(curv):
    """Rank-2 KPSVD terms in the block form are inverted per group (``KroneckerInverse``, two terms
    in the block form): no NotImplementedError, no numerical retries (their warnings), the
    direction of the grouped weight is the dense solve with its damped block-diagonal matrix, and
    the loss goes down."""
    import warnings

    from curvlib.optim import NaturalGradient
    from curvlib.solvers import KroneckerInverse

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(16, 4, 6, 6), torch.randint(0, 3, (16,))
    lam = 1e-2
    # every step captured and inverted, no clip (the defaults before issue 22): the step-0 direction is the solve
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=curv, damping=lam, ema_decay=0.0, T_cov=1, T_inv=1,
                          kl_clip=None)
    W = model[0].weight
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with opt.capture():
                loss.backward()
            before, g = W.detach().clone(), W.grad.clone()
            opt.step()
            losses.append(loss.item())
            if step == 0:
                terms = opt.state[W]["running"]
                assert len(terms) == 2 and terms[0][0].shape == (2, 3, 3) and terms[0][1].shape == (2, 18, 18)
                P = KroneckerInverse(terms, lam, opt.param_groups[0]["damping_mode"])
                d = torch.linalg.solve(P.damped_matrix(), g.reshape(-1))
                torch.testing.assert_close((before - W.detach()).reshape(-1), 0.1 * d)
    assert not [w for w in caught if "retrying" in str(w.message)]  # (a clipping notice may come)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_corrected_block_form_over_two_backwards(approx):
    """Two backwards of one context (half batches, loss scaled by 1/2) give the terms of the
    whole batch, KFAC term and correction."""
    from curvlib.extensions import KFACCorrected

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(16, 4, 6, 6), torch.randint(0, 3, (16,))
    kw = dict(fisher_type="type-2", kfac_approx=approx, algorithm="gram")
    with curvature(KFACCorrected(**kw)):
        loss_fn(model(x), y).backward()
    whole = model[0].weight.kfac_corrected
    model.zero_grad()
    with curvature(KFACCorrected(**kw)):
        for h in (slice(0, 8), slice(8, 16)):
            (0.5 * loss_fn(model(x[h]), y[h])).backward()
    halves = model[0].weight.kfac_corrected
    for (a0, a1), (b0, b1) in zip(whole, halves):
        torch.testing.assert_close(torch.kron(a0[1], a1[1]), torch.kron(b0[1], b1[1]))
        torch.testing.assert_close(torch.kron(a0[0], a1[0]), torch.kron(b0[0], b1[0]))
