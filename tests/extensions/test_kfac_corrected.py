"""KFAC corrected = KFAC term + top SVD term of the rearranged residual (dense references).

The exact blocks come from ``torch.func`` (``tests.utils``); the residual
``R(F) - vec(G) vec(A)^T`` is rearranged explicitly and decomposed by ``torch.linalg.svd``; the
KFAC term is checked against :class:`~curvlib.extensions.kfac.KFAC` on the same backward (itself
tested against BackPACK and curvlinops).
"""
import pytest
import torch

from curvlib.extensions.kfac import KFAC
from curvlib.extensions.kfac_corrected import KFACCorrected
from tests.utils import close, exact_blocks, rearrange_dense, run as backward
from tests.zoo import kpsvd_setup as setup


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "wide", "seq", "conv2d", "conv1d", "convT2d"])
def test_kfac_corrected_is_kfac_plus_top_svd_term_of_residual(name, fisher_type, method):
    model, loss_fn, x, y = setup(name)
    backward(model, loss_fn, x, y, KFACCorrected(fisher_type, method=method, maxiter=1000), KFAC(fisher_type))
    for F, p in zip(exact_blocks(model, loss_fn, x, y, fisher_type), model.parameters()):
        scale = F.abs().max()
        if p.dim() == 1:
            assert len(p.kfac_corrected) == 1
            close(p.kfac_corrected[0][0], F, scale, 1e-10)
            continue
        (G, A), (S, R) = p.kfac_corrected
        # same orientation and values as p.kfac (first factor over p.shape[0])
        close(G, p.kfac[0], p.kfac[0].abs().max(), 1e-10)
        close(A, p.kfac[1], p.kfac[1].abs().max(), 1e-10)
        d0, d1 = p.shape[0], p.numel() // p.shape[0]
        K = torch.kron(G, A)
        U, Sv, Vh = torch.linalg.svd(rearrange_dense(F - K, d0, d1))
        ref = Sv[0] * torch.kron(U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1))
        close(torch.kron(S, R), ref, scale)
        torch.testing.assert_close(torch.linalg.matrix_norm(S), torch.linalg.matrix_norm(R))
        # the correction never hurts, and helps unless KFAC is exact
        err_kfac = torch.linalg.matrix_norm(F - K)
        err_corr = torch.linalg.matrix_norm(F - K - torch.kron(S, R))
        assert err_corr <= err_kfac * (1 + 1e-9)
        assert err_corr < 0.99 * err_kfac


def test_reduce_approximation_uses_kfac_reduce_term():
    model, loss_fn, x, y = setup("conv2d")
    backward(model, loss_fn, x, y, KFACCorrected("type-2", kfac_approx="reduce"), KFAC("type-2", kfac_approx="reduce"))
    F = exact_blocks(model, loss_fn, x, y, "type-2")[0]
    p = model[0].weight
    (G, A), (S, R) = p.kfac_corrected
    close(torch.kron(G, A), torch.kron(*p.kfac), F.abs().max(), 1e-10)
    d0, d1 = p.shape[0], p.numel() // p.shape[0]
    U, Sv, Vh = torch.linalg.svd(rearrange_dense(F - torch.kron(G, A), d0, d1))
    close(torch.kron(S, R), Sv[0] * torch.kron(U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1)), F.abs().max())


def test_warm_start_same_batch_needs_fewer_products():
    model, loss_fn, x, y = setup("conv2d")
    ext = KFACCorrected("type-2", maxiter=1000)
    backward(model, loss_fn, x, y, ext)
    first, prods = [t.clone() for t in model[0].weight.kfac_corrected[1]], dict(ext.products)
    model.zero_grad()
    backward(model, loss_fn, x, y, ext)
    p = model[0].weight
    assert ext.products[id(p)] < prods[id(p)]
    close(torch.kron(*p.kfac_corrected[1]), torch.kron(*first), first[0].abs().max() * first[1].abs().max())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACCorrected(kfac_approx="average")
    with pytest.raises(ValueError, match="method"):
        KFACCorrected(method="qr")
