"""The exact Gram route of the Kronecker SVD against a dense SVD of the rearranged matrix and the
iterative driver (float64, small sizes).

``R = sum_j sum_{t,t'} vec(x0_jt x0_jt'^T) vec(x1_jt x1_jt'^T)^T`` is built densely from its
definition (the rearrangement of ``sum_j vec(X_j) vec(X_j)^T``, ``X_j = sum_t x0_jt x1_jt^T``).
"""
import pytest
import torch

from curvlib.solvers import kronecker_svd
from curvlib.solvers.kronecker_svd import gram_svd_flops, kronecker_svd_gram
from tests.utils import rearrange_dense

pytestmark = pytest.mark.usefixtures("float64")


def dense_R(x0, x1, correction=None):
    X = torch.einsum("jtd,jte->jde", x0, x1)  # per-sample matrices [M, r0, r1]
    F = torch.einsum("jde,jfg->defg", X, X).reshape(X[0].numel(), X[0].numel())
    R = rearrange_dense(F, x0.shape[-1], x1.shape[-1])
    if correction is not None:
        R = R - torch.outer(correction[0].reshape(-1), correction[1].reshape(-1))
    return R


def top_terms(R, k):
    U, S, Vh = torch.linalg.svd(R)
    return sum(S[i] * torch.outer(U[:, i], Vh[i]) for i in range(min(k, S.numel()))), S


def approx(U, S, V):
    return sum(S[i] * torch.outer(U[i].reshape(-1), V[i].reshape(-1)) for i in range(S.numel()))


CASES = [  # (M, T, r0, r1, rank)
    (7, 1, 3, 4, 2),  # more samples than ... a generic T = 1 case
    (40, 1, 3, 2, 3),  # P > r0^2: rank-deficient Grams (vec(x x^T) spans only 6 dimensions)
    (5, 2, 3, 4, 3),  # several positions: cross-position terms
    (2, 3, 4, 3, 4),
]


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("M,T,r0,r1,rank", CASES)
def test_gram_route_equals_dense_svd(M, T, r0, r1, rank, corrected):
    g = torch.Generator().manual_seed(M + T)
    x0, x1 = torch.randn(M, T, r0, generator=g), torch.randn(M, T, r1, generator=g)
    corr = (torch.randn(r0, r0, generator=g), torch.randn(r1, r1, generator=g)) if corrected else None
    R = dense_R(x0, x1, corr)
    U, S, V = kronecker_svd_gram(x0, x1, rank, corr)
    assert U.shape == (rank, r0, r0) and V.shape == (rank, r1, r1) and S.shape == (rank,)
    ref, Sref = top_terms(R, rank)
    torch.testing.assert_close(S, Sref[:rank], rtol=1e-10, atol=1e-10 * float(Sref[0]))
    torch.testing.assert_close(approx(U, S, V), ref, rtol=1e-9, atol=1e-9 * float(R.abs().max()))
    torch.testing.assert_close(torch.linalg.matrix_norm(U), torch.ones(rank))
    torch.testing.assert_close(torch.linalg.matrix_norm(V), torch.ones(rank))


def test_gram_route_matches_the_iterative_driver_and_its_sign_convention():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 1, 3, generator=g), torch.randn(6, 1, 4, generator=g)
    R = dense_R(x0, x1)  # a PSD block's rearrangement: leading factors PSD
    Ug, Sg, Vg = kronecker_svd_gram(x0, x1, 2)
    for method in ("power", "lanczos"):
        Ui, Si, Vi = kronecker_svd(lambda v: R @ v, lambda u: R.T @ u, (3, 4), 2, R, method, maxiter=2000, tol=1e-13)
        torch.testing.assert_close(Sg, Si, rtol=1e-9, atol=0)
        for i in range(2):  # same joint signs, not only the same products
            torch.testing.assert_close(Ug[i], Ui[i], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(Vg[i], Vi[i], rtol=1e-6, atol=1e-6)
    assert torch.linalg.eigvalsh(Ug[0]).min() > -1e-12 and torch.linalg.eigvalsh(Vg[0]).min() > -1e-12


def test_fewer_columns_than_terms_gives_zero_terms():
    # one sample, T = 1: R = vec(g g^T) vec(a a^T)^T has rank 1; rank=3 pads two zero triplets
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(1, 1, 3, generator=g), torch.randn(1, 1, 2, generator=g)
    U, S, V = kronecker_svd_gram(x0, x1, 3)
    torch.testing.assert_close(S[1:], torch.zeros(2))
    assert not U[1:].any() and not V[1:].any()
    torch.testing.assert_close(approx(U, S, V), dense_R(x0, x1))
    # two samples, rank 4: exactly two nonzero terms
    x0, x1 = torch.randn(2, 1, 3, generator=g), torch.randn(2, 1, 2, generator=g)
    U, S, V = kronecker_svd_gram(x0, x1, 4)
    assert (S[:2] > 0).all() and not S[2:].any()
    torch.testing.assert_close(approx(U, S, V), dense_R(x0, x1), rtol=1e-10, atol=1e-12)


def test_repeated_samples():
    # each sample three times: singular Grams; the same terms as one copy with 3x the weight
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(4, 1, 3, generator=g), torch.randn(4, 1, 5, generator=g)
    U, S, V = kronecker_svd_gram(x0.repeat(3, 1, 1), x1.repeat(3, 1, 1), 2)
    U1, S1, V1 = kronecker_svd_gram(x0, x1, 2)
    torch.testing.assert_close(S, 3 * S1)
    torch.testing.assert_close(approx(U, S, V), 3 * approx(U1, S1, V1))
    ref, _ = top_terms(dense_R(x0.repeat(3, 1, 1), x1.repeat(3, 1, 1)), 2)
    torch.testing.assert_close(approx(U, S, V), ref)


def test_float32_inputs_give_float32_terms_accurate_to_round_off():
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(30, 1, 20, generator=g), torch.rand(30, 1, 25, generator=g)
    U, S, V = kronecker_svd_gram(x0.float(), x1.float(), 2)
    U64, S64, V64 = kronecker_svd_gram(x0, x1, 2)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    torch.testing.assert_close(S.double(), S64, rtol=1e-6, atol=0)
    torch.testing.assert_close(approx(U.double(), S.double(), V.double()), approx(U64, S64, V64),
                               rtol=1e-5, atol=1e-5 * float(S64[0]))


def test_bad_shapes_raise_and_flops_grow_with_columns():
    with pytest.raises(ValueError, match="kronecker_svd_gram"):
        kronecker_svd_gram(torch.randn(3, 2, 4), torch.randn(3, 1, 4), 1)
    assert gram_svd_flops(512, 1, 1000, 784, 2) < gram_svd_flops(1024, 1, 1000, 784, 2)
    assert gram_svd_flops(64, 1, 10, 10, 1) < gram_svd_flops(64, 2, 10, 10, 1)
