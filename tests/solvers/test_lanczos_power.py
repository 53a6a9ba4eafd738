import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvlib.solvers import golub_kahan, lanczos, power_iteration_deflation


def sym_with_spectrum(evals, gen):
    n = len(evals)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    return Q @ torch.diag(torch.as_tensor(evals, dtype=torch.float64)) @ Q.T


def check_vectors(V, Vref, tol):
    cos = (V * Vref).sum(0).abs()
    assert torch.all(cos > 1 - tol), cos


@pytest.mark.parametrize("n", [12, 60])
def test_lanczos_vs_eigh_and_eigsh(gen, n):
    # n = 12: full Krylov space (round-off); n = 60: thick restarts (ncv = 20)
    evals = torch.cat([torch.tensor([10.0, 8.0, 6.5, 5.0]), torch.linspace(-1, 3, n - 4)]).tolist()
    A = sym_with_spectrum(evals, gen)
    v0 = torch.randn(n, generator=gen, dtype=torch.float64)
    k = 4
    w, V = lanczos(lambda v: A @ v, v0, k)
    L, Q = torch.linalg.eigh(A)
    torch.testing.assert_close(w, L.flip(0)[:k], rtol=1e-10, atol=1e-10)
    check_vectors(V, Q.flip(1)[:, :k], 1e-9)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    ws, Vs = spla.eigsh(A.numpy(), k=k, which="LA")
    order = np.argsort(-ws)
    np.testing.assert_allclose(w.numpy(), ws[order], rtol=1e-9)
    check_vectors(V, torch.from_numpy(Vs[:, order]), 1e-8)


def test_lanczos_shaped_v0_and_indefinite(gen):
    A = sym_with_spectrum(torch.linspace(-5, 2, 24).tolist(), gen)
    v0 = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    w, V = lanczos(lambda X: (A @ X.reshape(-1)).reshape(4, 6), v0, 3)
    assert V.shape == (24, 3)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-10, atol=1e-10)
    # residuals
    torch.testing.assert_close(A @ V, V * w, atol=1e-8, rtol=0)


def test_lanczos_invariant_subspace_start(gen):
    # v0 inside a 2-dim invariant subspace: the routine must continue with new directions
    n = 10
    A = torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64))
    v0 = torch.zeros(n, dtype=torch.float64)
    v0[0] = v0[1] = 1.0
    w, V = lanczos(lambda v: A @ v, v0, 3)
    torch.testing.assert_close(w, torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_lanczos_breakdown_does_not_stop_before_the_top_eigenvalue():
    """Guard of the breakdown rule (a breakdown ends the iteration only when the random vector
    that continues it breaks down at once)."""
    # the first invariant subspace (v0 = e_0) holds the smallest eigenvalue: the iteration
    # must go on with a random vector and find the largest one
    n = 50
    A = torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64))
    v0 = torch.zeros(n, dtype=torch.float64)
    v0[0] = 1.0
    w, V = lanczos(lambda v: A @ v, v0, 1)
    torch.testing.assert_close(w, torch.tensor([50.0], dtype=torch.float64), rtol=1e-10, atol=0)


def test_lanczos_errors(gen):
    with pytest.raises(ValueError, match="starting vector v0 is zero"):
        lanczos(lambda v: v, torch.zeros(5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="k must satisfy"):
        lanczos(lambda v: v, torch.ones(5, dtype=torch.float64), 6)
    with pytest.raises(ValueError, match="operator A returned NaN"):
        lanczos(lambda v: v * float("inf"), torch.ones(5, dtype=torch.float64), 2)


def rect_with_singular_values(m, n, s, gen):
    U = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(len(s)), range(len(s))] = torch.as_tensor(s, dtype=torch.float64)
    return U @ S @ V.T


@pytest.mark.parametrize("m,n", [(9, 16), (16, 9), (50, 70)])
def test_golub_kahan_vs_svd(gen, m, n):
    r = min(m, n)
    s = torch.cat([torch.tensor([9.0, 7.0, 4.0]), torch.linspace(2.0, 0.1, r - 3)])
    R = rect_with_singular_values(m, n, s, gen)
    v0 = torch.randn(n, generator=gen, dtype=torch.float64)
    k = 3
    U, S, V = golub_kahan(lambda v: R @ v, lambda u: R.T @ u, v0, k)
    Ur, Sr, Vhr = torch.linalg.svd(R)
    torch.testing.assert_close(S, Sr[:k], rtol=1e-10, atol=1e-10)
    check_vectors(U, Ur[:, :k], 1e-9)
    check_vectors(V, Vhr[:k].T, 1e-9)
    torch.testing.assert_close(R @ V, U * S, atol=1e-8, rtol=0)


def test_golub_kahan_matrix_shaped(gen):
    # rearrangement-like operator: v is a [3, 3] matrix, R v a [2, 2] matrix
    R = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    U, S, V = golub_kahan(
        lambda X: (R @ X.reshape(-1)).reshape(2, 2), lambda Y: (R.T @ Y.reshape(-1)).reshape(3, 3),
        torch.ones(3, 3, dtype=torch.float64), 2,
    )
    assert U.shape == (4, 2) and V.shape == (9, 2)
    torch.testing.assert_close(S, torch.linalg.svdvals(R)[:2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("warm", ["none", "vector", "matrix"])
def test_power_deflation_vs_svd(gen, warm):
    m, n, k = 12, 10, 3
    R = rect_with_singular_values(m, n, [10.0, 5.0, 2.5, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.0], gen)
    Ur, Sr, Vhr = torch.linalg.svd(R)
    if warm == "matrix":  # perturbed true vectors
        v0 = Vhr[:k].T + 0.1 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    else:
        v0 = torch.randn(n, generator=gen, dtype=torch.float64)
    U, S, V = power_iteration_deflation(lambda v: R @ v, lambda u: R.T @ u, v0, k, maxiter=2000, tol=1e-12)
    torch.testing.assert_close(S, Sr[:k], rtol=1e-10, atol=1e-10)
    check_vectors(U, Ur[:, :k], 1e-10)
    check_vectors(V, Vhr[:k].T, 1e-10)


def test_power_warm_start_is_faster(gen):
    R = rect_with_singular_values(8, 8, [3.0, 2.9, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1], gen)
    _, _, Vhr = torch.linalg.svd(R)
    counts = {}
    for name, v0 in {"cold": torch.ones(8, dtype=torch.float64), "warm": Vhr[0] + 1e-6}.items():
        calls = [0]

        def mv(v):
            calls[0] += 1
            return R @ v

        power_iteration_deflation(mv, lambda u: R.T @ u, v0, 1, maxiter=5000, tol=1e-10)
        counts[name] = calls[0]
    assert counts["warm"] < counts["cold"]


def test_power_nonconvergence_warns(gen):
    R = rect_with_singular_values(6, 6, [1.0, 0.999, 0.5, 0.1, 0.1, 0.1], gen)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        power_iteration_deflation(lambda v: R @ v, lambda u: R.T @ u, torch.ones(6, dtype=torch.float64), 1, maxiter=3)


def test_lanczos_which_and_float32(gen):
    A = sym_with_spectrum([-9.0, -3.0, -1.0, 0.5, 1.0, 2.0, 4.0, 5.0], gen)
    v0 = torch.randn(8, generator=gen, dtype=torch.float64)
    w, _ = lanczos(lambda v: A @ v, v0, 2, which="SA")
    torch.testing.assert_close(w, torch.tensor([-9.0, -3.0], dtype=torch.float64))
    w, _ = lanczos(lambda v: A @ v, v0, 2, which="LM")
    torch.testing.assert_close(w, torch.tensor([-9.0, 5.0], dtype=torch.float64))
    A32 = A.float()
    w, V = lanczos(lambda v: A32 @ v, v0.float(), 2)
    assert w.dtype == torch.float32 and V.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([5.0, 4.0]), rtol=1e-5, atol=1e-5)


def test_golub_kahan_float32_low_numerical_rank_stops_early():
    """Regression: in float32 an operator of low numerical rank broke down at every step
    (each random restart vector is mapped to ~0) and ran to maxiter (seen: 163,840
    products inside KPSVD). A breakdown right after a restart now ends the iteration."""
    import warnings

    torch.manual_seed(0)
    L = torch.randn(300, 3, dtype=torch.float64)
    Rm = L @ torch.randn(3, 200, dtype=torch.float64)  # rank 3
    Rm32 = Rm.float()
    calls = [0]

    def mv(x):
        calls[0] += 1
        return Rm32 @ x

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge" warning either
        U, S, V = golub_kahan(mv, lambda u: Rm32.T @ u, torch.randn(200), k=2)
    assert calls[0] < 60
    ref = torch.linalg.svdvals(Rm)[:2].float()
    torch.testing.assert_close(S, ref, rtol=1e-4, atol=0)
