"""Two-level KFAC on a dense 4-block problem (3 weights + 1 bias) with exact cross-layer Fisher."""
import math

import pytest
import torch

from curvlib.solvers import KroneckerInverse, coarse_basis, coarse_operator, kronecker_fisher_mvp, two_level_direction

SHAPES = [(4, 3), (3, 5), (2, 3), (2,)]
N, LAM = 40, 1e-2


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(1)
    dt = torch.float64
    z = torch.randn(N, 3, generator=gen, dtype=dt)  # shared latent -> cross-layer correlation
    acts, grads = [], []
    for out, inn in SHAPES[:3]:
        acts.append(z @ torch.randn(3, inn, generator=gen, dtype=dt) + 0.5 * torch.randn(N, inn, generator=gen, dtype=dt))
        grads.append(z @ torch.randn(3, out, generator=gen, dtype=dt) + 0.5 * torch.randn(N, out, generator=gen, dtype=dt))
    acts.append(torch.ones(N, 1, dtype=dt))  # bias layer shares layer 3's output gradient
    grads.append(grads[2])
    # per-sample gradients X_n^l = g_n a_n^T, whole-network vectors [N, n]
    X = torch.cat([torch.einsum("no,ni->noi", g, a).reshape(N, -1) for g, a in zip(grads, acts)], dim=1)
    F = X.T @ X / N
    n = F.shape[0]
    sizes = [math.prod(s) for s in SHAPES]
    factors = [[g.T @ g / N, a.T @ a / N] for g, a in zip(grads[:3], acts[:3])] + [[grads[3].T @ grads[3] / N]]
    cross = [[[grads[i].T @ grads[j] / N, acts[i].T @ acts[j] / N] for j in range(4)] for i in range(4)]
    gvec = X.mean(0)

    def split(v):
        return [t.reshape(s) for t, s in zip(torch.split(v, sizes), SHAPES)]

    def cat(xs):
        return torch.cat([t.reshape(-1) for t in xs])

    def fisher_mvp(xs):
        return split(F @ cat(xs))

    def fisher_mvp_batched(xs):  # [V, *shape] lists
        V = torch.cat([t.reshape(t.shape[0], -1) for t in xs], dim=1)
        Y = V @ F
        return [t.reshape((V.shape[0],) + s) for t, s in zip(torch.split(Y, sizes, dim=1), SHAPES)]

    precond = [KroneckerInverse(f, LAM) for f in factors]
    Ahat = F + LAM * torch.eye(n, dtype=dt)
    exact = torch.linalg.solve(Ahat, gvec)
    # dense cross-Kronecker approximation used by the Tselepidis coarse space
    blocks = [[torch.kron(cross[i][j][0], cross[i][j][1]) for j in range(4)] for i in range(4)]
    Ftilde = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    return dict(F=F, Ahat=Ahat, g=split(gvec), gvec=gvec, exact=exact, fisher_mvp=fisher_mvp,
                fisher_mvp_batched=fisher_mvp_batched, precond=precond, factors=factors, cross=cross,
                Ftilde=Ftilde, cat=cat, split=split)


SPACES = ["nicolaides", "residual", "spectral", "tpselepedis"]


def run(problem, space, krylov, **kw):
    return two_level_direction(
        problem["g"], problem["precond"], problem["fisher_mvp"], LAM, coarse_space=space, krylov=krylov,
        factors=problem["factors"], cross_factors=problem["cross"], **kw,
    )


def anorm(problem, d):
    e = problem["exact"] - problem["cat"](d)
    return float(torch.sqrt(e @ problem["Ahat"] @ e))


@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("space", SPACES)
def test_coarse_operator_matches_dense(problem, space, krylov):
    d, info = run(problem, space, krylov)
    basis = info["basis"]
    R0 = basis.dense()
    expected_dim = (2 if krylov else 1) * 4
    if space == "spectral" and krylov:
        # the bias block of F is exactly G, so q_G is an eigenvector of it: no Krylov vector there
        expected_dim = 7
    assert R0.shape == (expected_dim, problem["F"].shape[0]) and info["coarse_dim"] == expected_dim
    torch.testing.assert_close(R0 @ R0.T, torch.eye(expected_dim, dtype=R0.dtype), atol=1e-12, rtol=0)
    Fop = problem["Ftilde"] if space == "tpselepedis" else problem["F"]
    dense_A0 = R0 @ (Fop + LAM * torch.eye(Fop.shape[0], dtype=Fop.dtype)) @ R0.T
    torch.testing.assert_close(info["coarse_matrix"], dense_A0, rtol=1e-10, atol=1e-12)
    # direction = d1 + R0^T A0^-1 R0 r with r = g - (F + λI) d1 (the exact F for the residual)
    d1 = problem["cat"](info["one_level"])
    r = problem["gvec"] - problem["Ahat"] @ d1
    torch.testing.assert_close(problem["cat"](info["residual"]), r)
    ref = d1 + R0.T @ torch.linalg.solve(dense_A0, R0 @ r)
    torch.testing.assert_close(problem["cat"](d), ref, rtol=1e-9, atol=1e-11)


def test_tpselepedis_formula(problem):
    basis = coarse_basis(problem["g"], "tpselepedis", cross_factors=problem["cross"])
    A0 = coarse_operator(basis, 0.0, cross_factors=problem["cross"])
    sizes = [math.prod(s) for s in SHAPES]
    for i in range(4):
        for j in range(4):
            G, A = problem["cross"][i][j]
            assert float(A0[i, j]) == pytest.approx(float(G.sum() * A.sum()) / math.sqrt(sizes[i] * sizes[j]), rel=1e-10)


def test_spectral_uses_smallest_eigenvectors(problem):
    basis = coarse_basis(problem["g"], "spectral", factors=problem["factors"])
    G, A = problem["factors"][0]
    qg, qa = torch.linalg.eigh(G)[1][:, 0], torch.linalg.eigh(A)[1][:, 0]
    z = basis.vectors[0].reshape(-1)
    assert abs(float(z @ torch.kron(qg, qa))) == pytest.approx(1.0, abs=1e-10)
    big = coarse_basis(problem["g"], "spectral", factors=problem["factors"], spectral_end="largest")
    assert abs(float(big.vectors[0].reshape(-1) @ torch.kron(qg, qa))) < 0.5


# A-norm error ratios ||Â^-1 g - d||_Â / ||Â^-1 g - d1||_Â on this problem (recorded, krylov off/on):
# nicolaides 0.44/0.29, residual 0.34/0.29, spectral 0.69/0.49, tpselepedis 2.43/2.47.
# Spaces with the exact coarse operator can only reduce the error (Â-orthogonal projection onto
# span(R0^T)); the Tselepidis coarse operator uses the cross-Kronecker approximation
# F_ij ≈ G_ij ⊗ A_ij, has no such guarantee, and on this problem makes the direction worse than
# one-level KFAC (in line with Koroko et al. 2023, who found no gain from the two-level variants).
@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("space", SPACES)
def test_error_reduction_vs_one_level(problem, space, krylov):
    d, info = run(problem, space, krylov)
    e1, e2 = anorm(problem, info["one_level"]), anorm(problem, d)
    ratio = e2 / e1
    print(f"{space:12s} krylov={krylov!s:5s} A-norm error ratio two-level/one-level = {ratio:.4f}")
    if space != "tpselepedis":
        # exact coarse operator: Galerkin projection, never worse, and the new residual is ⊥ span(R0^T)
        assert ratio <= 1.0 + 1e-12
        r_new = problem["gvec"] - problem["Ahat"] @ problem["cat"](d)
        torch.testing.assert_close(info["basis"].dense() @ r_new, torch.zeros(info["coarse_dim"], dtype=r_new.dtype), atol=1e-10, rtol=0)
        assert ratio < 0.999  # strict reduction on this problem
    else:
        # approximate coarse operator: what is true here is that it hurts (ratio ~2.4)
        assert 1.0 < ratio < 5.0


def test_residual_space_is_best_here(problem):
    ratios = {s: anorm(problem, run(problem, s, False)[0]) for s in SPACES}
    assert min(ratios, key=ratios.get) == "residual"


def test_batched_fisher_and_single_callable_precond(problem):
    d_ref, info_ref = run(problem, "nicolaides", True)

    def precond_all(xs):
        return [P(x) for P, x in zip(problem["precond"], xs)]

    d, info = two_level_direction(problem["g"], precond_all, problem["fisher_mvp_batched"], LAM,
                                  coarse_space="nicolaides", krylov=True, batched=True)
    for a, b in zip(d, d_ref):
        torch.testing.assert_close(a, b)
    # one residual product + 1 batched call for the first vectors + 1 for the Krylov vectors
    assert info["fisher_products"] == 3
    assert info_ref["fisher_products"] == 1 + 2 * 4


def test_kronecker_fisher_mvp_dense(problem):
    mvp = kronecker_fisher_mvp(problem["cross"], SHAPES)
    v = torch.randn(problem["F"].shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(problem["cat"](mvp(problem["split"](v))), problem["Ftilde"] @ v)


def test_errors(problem):
    g = [t.clone() for t in problem["g"]]
    g[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="gradient of layer 1 contains NaN"):
        two_level_direction(g, problem["precond"], problem["fisher_mvp"], LAM)
    with pytest.raises(ValueError, match="coarse_space must be one of"):
        run(problem, "bogus", False)
    with pytest.raises(ValueError, match="needs factors="):
        two_level_direction(problem["g"], problem["precond"], problem["fisher_mvp"], LAM, coarse_space="spectral")
    with pytest.raises(ValueError, match="needs cross_factors"):
        two_level_direction(problem["g"], problem["precond"], problem["fisher_mvp"], LAM, coarse_space="tpselepedis")
    neg = lambda xs: [-t for t in problem["fisher_mvp"](xs)]
    with pytest.raises(ValueError, match="coarse matrix .* not positive definite"):
        two_level_direction(problem["g"], problem["precond"], neg, LAM)


def test_krylov_skips_a_layer_whose_first_vector_is_in_the_null_space():
    """Softmax outputs: the constant vector on the last layer is in the GGN's null space; its
    Krylov vector would be normalized round-off noise and must be left out."""
    torch.manual_seed(0)
    M = torch.randn(6, 6, dtype=torch.float64)
    F = torch.zeros(9, 9, dtype=torch.float64)
    F[:6, :6] = M @ M.T
    # F[6:, 6:] maps the constant vector to round-off-sized noise (not parallel to it)
    F[6:, 6:] = 1e-15 * torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64)

    def mvp(xs):
        v = torch.cat([xs[0].reshape(-1), xs[1].reshape(-1)])
        o = F @ v
        return [o[:6].reshape(3, 2), o[6:]]

    g = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    basis = coarse_basis(g, "nicolaides", krylov=True, fisher_mvp=mvp)
    assert basis.layers == [0, 0, 1]
