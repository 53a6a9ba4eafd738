"""KPSVD against the SVD of the explicitly rearranged dense curvature block (Van Loan–Pitsianis).

References: the exact GGN from ``torch.func`` (``tests.utils.dense_ggn``) for type-2 and the
empirical Fisher from ``torch.func`` per-sample gradients; each weight block is rearranged
explicitly and decomposed with ``torch.linalg.svd``.
"""
import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.engine.capture import LayerCapture
from curvlib.extensions.base import Extension
from curvlib.extensions.kfac import KFAC
from curvlib.extensions.kpsvd import KPSVD
from curvlib.extensions.rearranged import RearrangedBlock
from curvlib.solvers.kronecker_svd import kronecker_svd
from tests.utils import close, exact_blocks, rearrange_dense, run as backward
from tests.zoo import kpsvd_nets as nets, kpsvd_setup as setup


pytestmark = pytest.mark.usefixtures("float64")


def svd_terms(F, d0, d1, rank):
    """[s_i kron(U_i, V_i)] of the top ``rank`` singular triplets of the rearranged block."""
    U, S, Vh = torch.linalg.svd(rearrange_dense(F, d0, d1))
    return [S[i] * torch.kron(U[:, i].reshape(d0, d0), Vh[i].reshape(d1, d1)) for i in range(rank)], S


# ------------------------------------------------------------------ the operator


class KeepBlock(Extension):
    savefield = "rblock"

    def __init__(self, **kw):
        super().__init__("type-2")
        self.kw = kw

    def compute(self, capture: LayerCapture):
        return {"weight": RearrangedBlock.from_capture(capture, self.source, **self.kw)}


@pytest.mark.parametrize("form", ["factored", "grads"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["mlp", "wide", "seq", "conv2d", "convT2d"])
def test_rearranged_products_match_dense_rearrangement(name, form, compress):
    model, loss_fn, x, y = setup(name)
    backward(model, loss_fn, x, y, KeepBlock(form=form, compress=compress))
    blocks = exact_blocks(model, loss_fn, x, y, "type-2")
    compressed = False
    for F, p in zip(blocks, model.parameters()):
        if p.dim() == 1:
            continue
        b = p.rblock
        d0, d1 = p.shape[0], p.numel() // p.shape[0]
        assert b.d == (d0, d1) and b.form == form
        compressed |= b.r != b.d
        R = rearrange_dense(F, d0, d1)
        V, U = torch.randn(d1, d1), torch.randn(d0, d0)
        Rv = b.expand(b.matvec(b.project(V, 1).reshape(-1)).reshape(b.r[0], b.r[0]), 0)
        Rtu = b.expand(b.rmatvec(b.project(U, 0).reshape(-1)).reshape(b.r[1], b.r[1]), 1)
        close(Rv.reshape(-1), R @ V.reshape(-1), R.abs().max() * V.abs().max())
        close(Rtu.reshape(-1), R.T @ U.reshape(-1), R.abs().max() * U.abs().max())
        RtI = b.expand(b.rmatvec_identity().reshape(b.r[1], b.r[1]), 1)
        close(RtI.reshape(-1), R.T @ torch.eye(d0).reshape(-1), R.abs().max())
    assert compressed if compress and name == "wide" else True
    assert not compressed if not compress else True


def test_auto_form_is_factored_for_linear_and_grads_for_many_positions():
    model, loss_fn, x, y = setup("mlp")
    backward(model, loss_fn, x, y, KeepBlock())
    assert model[0].weight.rblock.form == "factored"
    conv = extend(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 36, 3)))
    x = torch.randn(4, 3, 8, 8)
    backward(conv, loss_fn, x, torch.randint(0, 3, (4,)), KeepBlock())
    b = conv[0].weight.rblock
    assert b.form == "grads" and b.flops["grads"] < b.flops["factored"]


# ------------------------------------------------------------------ KPSVD


@pytest.mark.parametrize("method", ["power", "deflation", "lanczos"])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", list(nets()))
def test_kpsvd_equals_top_svd_terms_of_rearranged_block(name, fisher_type, rank, method):
    model, loss_fn, x, y = setup(name, reduction="sum" if name == "seq" else "mean")
    ext = KPSVD(fisher_type=fisher_type, rank=rank, method=method, maxiter=1000)
    backward(model, loss_fn, x, y, ext)
    for F, (pname, p) in zip(exact_blocks(model, loss_fn, x, y, fisher_type), model.named_parameters()):
        scale = F.abs().max()
        if p.dim() == 1:
            assert len(p.kpsvd) == 1 and len(p.kpsvd[0]) == 1
            close(p.kpsvd[0][0], F, scale, 1e-10)
            continue
        d0, d1 = p.shape[0], p.numel() // p.shape[0]
        ref, S = svd_terms(F, d0, d1, rank)
        assert len(p.kpsvd) == rank
        for (G, A), term in zip(p.kpsvd, ref):
            assert G.shape == (d0, d0) and A.shape == (d1, d1)
            close(torch.kron(G, A), term, scale)  # each term up to the joint sign of (U_i, V_i)
            torch.testing.assert_close(torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(A))
        close(sum(torch.kron(G, A) for G, A in p.kpsvd), sum(ref), scale)
        # leading term of a PSD block: both factors PSD, positive traces
        G1, A1 = p.kpsvd[0]
        for M in (G1, A1):
            assert torch.trace(M) > 0
            assert torch.linalg.eigvalsh(M).min() >= -1e-8 * torch.linalg.eigvalsh(M).max(), pname


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_kronecker_svd_of_dense_psd_block_fixes_signs(method):
    d0, d1 = 3, 4
    X = torch.randn(20, d0 * d1)
    F = X.T @ X + 5 * torch.kron(torch.eye(d0), torch.ones(d1, d1))  # PSD
    R = rearrange_dense(F, d0, d1)
    # a start with negative trace: without the sign rule the factors come out negative
    v0 = -torch.eye(d1).reshape(-1, 1)
    U, S, V = kronecker_svd(lambda v: R @ v, lambda u: R.T @ u, (d0, d1), 2, F, method, v0=v0, maxiter=2000)
    ref, Sref = svd_terms(F, d0, d1, 2)
    torch.testing.assert_close(S, Sref[:2])
    for i in range(2):
        close(S[i] * torch.kron(U[i], V[i]), ref[i], F.abs().max())
    assert torch.trace(U[0]) > 0 and torch.trace(V[0]) > 0
    for i in range(2):
        tu, tv = torch.trace(U[i]), torch.trace(V[i])
        assert (tu if tu.abs() >= tv.abs() else tv) > 0


@pytest.mark.parametrize("name", ["mlp", "conv2d", "convT2d", "seq"])
def test_kpsvd_is_closer_than_kfac_and_rank2_closer_than_rank1(name):
    model, loss_fn, x, y = setup(name)
    ext1, ext2 = KPSVD("type-2", rank=1), KPSVD("type-2", rank=2, method="lanczos")
    errs = {}
    for key, ext in [("kpsvd1", ext1), ("kpsvd2", ext2), ("kfac", KFAC("type-2"))]:
        model.zero_grad()
        backward(model, loss_fn, x, y, ext)
        errs[key] = {}
        for F, (pname, p) in zip(exact_blocks(model, loss_fn, x, y, "type-2"), model.named_parameters()):
            if p.dim() > 1:
                terms = p.kfac if key == "kfac" else [t for t in p.kpsvd]
                approx = torch.kron(*terms) if key == "kfac" else sum(torch.kron(G, A) for G, A in terms)
                errs[key][pname] = float(torch.linalg.matrix_norm(F - approx))
    for pname in errs["kfac"]:
        assert errs["kpsvd1"][pname] <= errs["kfac"][pname] * (1 + 1e-9)
        assert errs["kpsvd2"][pname] <= errs["kpsvd1"][pname] * (1 + 1e-9)
    # on convolutions KFAC is not the optimum (cross-position terms)
    if name in ("conv2d", "convT2d"):
        first = next(iter(errs["kfac"]))
        assert errs["kpsvd1"][first] < 0.99 * errs["kfac"][first]


def test_full_rank_kpsvd_reconstructs_the_block():
    model, loss_fn, x, y = setup("mlp")
    d0, d1 = 3, 4
    ext = KPSVD("type-2", rank=min(d0, d1) ** 2 + 2, method="lanczos")  # more terms than R has
    with pytest.warns(UserWarning, match="exceeds the 9 Kronecker terms"):
        backward(model, loss_fn, x, y, ext)
    F = exact_blocks(model, loss_fn, x, y, "type-2")[2]
    terms = model[2].weight.kpsvd
    assert len(terms) == d0**2  # clamped to the most terms a 3 x 4 block has
    close(sum(torch.kron(G, A) for G, A in terms), F, F.abs().max(), 1e-9)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_warm_start_same_batch_needs_fewer_products_and_gives_same_terms(method):
    # conv weight: R is 36 x 729, larger than the Lanczos basis (so no exact-by-completion)
    model = extend(nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 3)))
    loss_fn, x, y = extend(nn.CrossEntropyLoss()), torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    ext = KPSVD("type-2", rank=2, method=method, maxiter=1000, algorithm="iterative")
    backward(model, loss_fn, x, y, ext)
    first = {id(p): [t.clone() for t in p.kpsvd[0]] for p in model.parameters() if p.dim() > 1}
    prods = dict(ext.products)
    model.zero_grad()
    backward(model, loss_fn, x, y, ext)
    for p in model.parameters():
        if p.dim() > 1:
            if method == "power" or p is model[0].weight:
                assert ext.products[id(p)] < prods[id(p)]
            close(torch.kron(*p.kpsvd[0]), torch.kron(*first[id(p)]), first[id(p)][0].abs().max() ** 2)
    # a warm start from another batch converges to the same terms as a cold start
    x2, y2 = torch.randn_like(x), torch.randint(0, 3, y.shape)
    cold = KPSVD("type-2", rank=2, method=method, maxiter=1000, warm_start=False, algorithm="iterative")
    for e in (ext, cold):
        model.zero_grad()
        backward(model, loss_fn, x2, y2, e)
        if e is ext:
            warm = [[t.clone() for t in term] for term in model[0].weight.kpsvd]
    for (Gw, Aw), (Gc, Ac) in zip(warm, model[0].weight.kpsvd):
        close(torch.kron(Gw, Aw), torch.kron(Gc, Ac), Gc.abs().max() * Ac.abs().max())


def test_mc_approaches_type2():
    model, loss_fn, x, y = setup("mlp")
    backward(model, loss_fn, x, y, KPSVD("mc", mc_samples=4000))
    for F, p in zip(exact_blocks(model, loss_fn, x, y, "type-2"), model.parameters()):
        if p.dim() > 1:
            ref, _ = svd_terms(F, p.shape[0], p.shape[1], 1)
            err = torch.linalg.matrix_norm(torch.kron(*p.kpsvd[0]) - ref[0]) / torch.linalg.matrix_norm(ref[0])
            assert err < 0.1


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_float32_matches_float64(method):
    model, loss_fn, x, y = setup("wide")
    backward(model, loss_fn, x, y, KPSVD("type-2", rank=2, method=method))
    ref = [torch.kron(G, A) for G, A in model[0].weight.kpsvd]
    model.float().zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-convergence warnings in float32
        backward(model, loss_fn, x.float(), y, KPSVD("type-2", rank=2, method=method))
    for (G, A), r in zip(model[0].weight.kpsvd, ref):
        assert G.dtype == torch.float32
        torch.testing.assert_close(torch.kron(G, A).double(), r, rtol=1e-3, atol=1e-3 * float(r.abs().max()))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="method"):
        KPSVD(method="svd")
    with pytest.raises(ValueError, match="rank"):
        KPSVD(rank=0)
    with pytest.raises(ValueError, match="algorithm"):
        KPSVD(algorithm="qr")
    with pytest.raises(ValueError, match="fisher_type"):
        KPSVD(fisher_type="exact")


# ------------------------------------------------------------------ the exact Gram route


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "wide", "seq", "conv1d", "convT2d"])
def test_gram_route_equals_top_svd_terms_and_the_iterative_route(name, fisher_type, rank):
    if name == "convT2d" and (fisher_type == "type-2" or rank != 2):
        pytest.skip("9 positions: 81 Gram columns per sample; one case covers the activation-first layer")
    model, loss_fn, x, y = setup(name, reduction="sum" if name == "seq" else "mean")
    if name == "convT2d":
        x, y = x[:2], y[:2]  # 2 x 81 = 162 Gram columns
    gram = KPSVD(fisher_type=fisher_type, rank=rank, algorithm="gram")
    backward(model, loss_fn, x, y, gram)
    got = {id(p): [[t.clone() for t in term] for term in p.kpsvd] for p in model.parameters()}
    model.zero_grad()
    it = KPSVD(fisher_type=fisher_type, rank=rank, method="lanczos", algorithm="iterative", maxiter=2000)
    backward(model, loss_fn, x, y, it)
    for F, (pname, p) in zip(exact_blocks(model, loss_fn, x, y, fisher_type), model.named_parameters()):
        scale = F.abs().max()
        if p.dim() == 1:  # biases: the exact block, untouched by the route
            close(got[id(p)][0][0], F, scale, 1e-10)
            continue
        assert gram.routes[id(p)] == "gram" and gram.products[id(p)] == 0
        d0, d1 = p.shape[0], p.numel() // p.shape[0]
        ref, S = svd_terms(F, d0, d1, rank)
        terms = got[id(p)]
        assert len(terms) == rank
        for (G, A), term in zip(terms, ref):
            assert G.shape == (d0, d0) and A.shape == (d1, d1)
            close(torch.kron(G, A), term, scale, 1e-9)
            torch.testing.assert_close(torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(A))
        # same factors as the iterative route, signs included where the trace rule decides them
        # (an antisymmetric pair has zero traces and no defined sign)
        for (G, A), (Gi, Ai) in zip(terms, p.kpsvd):
            close(torch.kron(G, A), torch.kron(Gi, Ai), scale, 1e-6)
            if max(abs(float(torch.trace(M))) / float(torch.linalg.matrix_norm(M)) for M in (G, A)) > 1e-6:
                close(G, Gi, G.abs().max(), 1e-5)
                close(A, Ai, A.abs().max(), 1e-5)
        G1, A1 = terms[0]
        assert torch.trace(G1) > 0 and torch.trace(A1) > 0


def test_gram_route_pads_zero_terms_when_the_batch_has_fewer_columns_than_terms():
    # one sample, empirical Fisher, T = 1: the block is one Kronecker product; rank 3 -> 2 zero terms
    model, loss_fn, x, y = setup("mlp")
    x, y = x[:1], y[:1]
    ext = KPSVD("empirical", rank=3, algorithm="gram")
    backward(model, loss_fn, x, y, ext)
    F = exact_blocks(model, loss_fn, x, y, "empirical")[0]
    (G1, A1), (G2, A2), (G3, A3) = model[0].weight.kpsvd
    close(torch.kron(G1, A1), F, F.abs().max(), 1e-10)
    for M in (G2, A2, G3, A3):
        assert not M.any()


def test_auto_route_picks_gram_for_wide_rank2_linear_and_iterative_otherwise():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(120, 100), nn.Tanh(), nn.Linear(100, 3)))
    loss_fn, x, y = extend(nn.CrossEntropyLoss()), torch.randn(32, 120), torch.randint(0, 3, (32,))
    backward(model, loss_fn, x, y, KeepBlock())
    block = model[0].weight.rblock  # 2 x 32 Gram columns (T = 1), working sizes 100 x 32 (compressed)
    assert block.r == (100, 32) and block.K * block.N == 64
    assert KPSVD("type-2", rank=2, method="deflation")._route(block, 2) == "gram"
    assert KPSVD("type-2", rank=2, method="lanczos")._route(block, 2) == "gram"
    assert KPSVD("type-2", rank=1, method="power")._route(block, 1) == "iterative"
    assert KPSVD("type-2", rank=1, method="power", algorithm="gram")._route(block, 1) == "gram"
    # the route taken is recorded
    ext = KPSVD("type-2", rank=2, method="lanczos")
    model.zero_grad()
    backward(model, loss_fn, x, y, ext)
    assert ext.routes[id(model[0].weight)] == "gram" and ext.products[id(model[0].weight)] == 0
    # many positions: 8 x 3 x 36^2 Gram columns, over GRAM_MAX_COLUMNS
    conv = extend(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3)))
    backward(conv, loss_fn, torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)), KeepBlock())
    assert KPSVD("type-2", rank=2, method="deflation")._route(conv[0].weight.rblock, 2) == "iterative"


def test_kfac_corrected_gram_route_equals_dense_residual_svd():
    from curvlib.extensions.kfac_corrected import KFACCorrected

    for name in ("mlp", "seq"):
        model, loss_fn, x, y = setup(name)
        ext = KFACCorrected("type-2", algorithm="gram")
        backward(model, loss_fn, x, y, ext)
        for F, p in zip(exact_blocks(model, loss_fn, x, y, "type-2"), model.parameters()):
            if p.dim() == 1:
                continue
            (G, A), (S, R) = p.kfac_corrected
            d0, d1 = p.shape[0], p.numel() // p.shape[0]
            U, Sv, Vh = torch.linalg.svd(rearrange_dense(F - torch.kron(G, A), d0, d1))
            close(torch.kron(S, R), Sv[0] * torch.kron(U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1)), F.abs().max(), 1e-9)
            assert ext.routes[id(p)] == "gram"
