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
FORMS = ["additive", "multiplicative"]


def run(problem, space, krylov, **kw):
    return two_level_direction(
        problem["g"], problem["precond"], problem["fisher_mvp"], LAM, coarse_space=space, krylov=krylov,
        factors=problem["factors"], cross_factors=problem["cross"], **kw,
    )


def anorm(problem, d):
    e = problem["exact"] - problem["cat"](d)
    return float(torch.sqrt(e @ problem["Ahat"] @ e))


def reference_basis(problem, space, krylov):
    """The coarse basis of Koroko et al. 2023, built densely: columns ``[n, c]`` (unnormalized:
    the direction does not depend on the scaling of the columns)."""
    sizes = [math.prod(s) for s in SHAPES]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    n = sum(sizes)
    d1 = torch.cat([P(g).reshape(-1) for P, g in zip(problem["precond"], problem["g"])])
    r = problem["gvec"] - problem["Ahat"] @ d1
    Pr = [P(t).reshape(-1) for P, t in zip(problem["precond"], problem["split"](r))]
    first = []
    for l, (o, m) in enumerate(zip(offsets, sizes)):
        if space in ("nicolaides", "tpselepedis"):
            v = torch.ones(m, dtype=torch.float64)
        elif space == "residual":
            v = Pr[l]
        else:
            f = problem["factors"][l]
            qs = [torch.linalg.eigh(F)[1][:, 0] for F in f]
            v = qs[0] if len(qs) == 1 else torch.kron(qs[0], qs[1])
        first.append(v)
    cols = []
    for l, (o, m) in enumerate(zip(offsets, sizes)):
        z = torch.zeros(n, dtype=torch.float64)
        z[o:o + m] = first[l]
        cols.append(z)
        if krylov:
            w = problem["precond"][l](first[l].reshape(SHAPES[l])).reshape(-1)  # P_l z_l
            w = w - (w @ first[l]) / (first[l] @ first[l]) * first[l]
            if w.norm() > 1e-6 * first[l].norm():
                z = torch.zeros(n, dtype=torch.float64)
                z[o:o + m] = w
                cols.append(z)
    return torch.stack(cols, 1), d1, r


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("space", SPACES)
def test_direction_is_the_papers_formula(problem, space, krylov, form):
    """``d = d1 + Z (Z^T Â Z)^-1 Z^T b``, ``b = g`` (additive) or ``g - Â d1`` (multiplicative),
    with ``Z`` the coarse space built independently (dense) from its definition."""
    d, info = run(problem, space, krylov, form=form)
    Z, d1, r = reference_basis(problem, space, krylov)
    expected_dim = Z.shape[1]
    assert expected_dim == (4 if space == "spectral" else (8 if krylov else 4))  # spectral: P_l z_l ∥ z_l
    assert info["coarse_dim"] == expected_dim
    R0 = info["basis"].dense()
    torch.testing.assert_close(R0 @ R0.T, torch.eye(expected_dim, dtype=R0.dtype), atol=1e-12, rtol=0)
    # same span as the reference basis
    proj = R0.T @ R0
    torch.testing.assert_close(proj @ Z, Z, rtol=1e-9, atol=1e-11)
    Fop = problem["Ftilde"] if space == "tpselepedis" else problem["F"]
    A = Fop + LAM * torch.eye(Fop.shape[0], dtype=Fop.dtype)
    torch.testing.assert_close(info["coarse_matrix"], R0 @ A @ R0.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem["cat"](info["one_level"]), d1)
    b = problem["gvec"] if form == "additive" else r
    ref = d1 + Z @ torch.linalg.solve(Z.T @ A @ Z, Z.T @ b)
    torch.testing.assert_close(problem["cat"](d), ref, rtol=1e-9, atol=1e-11)


def test_additive_form_uses_the_gradient_not_the_residual(problem):
    """The paper's (and Tselepidis') correction: ``R0^T A0^-1 R0 g`` added to ``d1``."""
    d, info = run(problem, "nicolaides", False)  # default form
    basis = info["basis"]
    torch.testing.assert_close(info["coarse_rhs"], basis.restrict(problem["g"]))
    y = torch.linalg.solve(info["coarse_matrix"], basis.restrict(problem["g"]))
    want = [a + b for a, b in zip(info["one_level"], basis.prolong(y))]
    for a, b in zip(d, want):
        torch.testing.assert_close(a, b)
    assert info["residual"] is None and info["fisher_products"] == 4  # one per coarse column, none for F d1


def test_residual_space_is_the_preconditioned_residual(problem):
    _, info = run(problem, "residual", False)
    for l, z in zip(info["basis"].layers, info["basis"].vectors):
        Pr = problem["precond"][l](info["residual"][l])
        cos = float((z * Pr).sum() / (z.norm() * Pr.norm()))
        assert cos == pytest.approx(1.0, abs=1e-12)
        if Pr.dim() > 1:  # P_l r_l is not parallel to r_l here
            r = info["residual"][l]
            assert abs(float((z * r).sum() / (z.norm() * r.norm()))) < 0.99


def test_krylov_vector_is_the_preconditioned_first_vector(problem):
    _, info = run(problem, "nicolaides", True)
    basis = info["basis"]
    for l in range(len(SHAPES)):
        z1, z2 = [v for c, v in zip(basis.layers, basis.vectors) if c == l]
        w = problem["precond"][l](z1)
        w = w - (w * z1).sum() * z1
        torch.testing.assert_close(z2, w / w.norm(), rtol=1e-10, atol=1e-12)


# A-norm error ratios ||Â^-1 g - d||_Â / ||Â^-1 g - d1||_Â on this problem (recorded, krylov off/on):
# multiplicative: nicolaides 0.44/0.33, residual 0.15/0.12, spectral 0.69/0.69, tpselepedis 2.43/2.73;
# additive (the paper's): nicolaides 1.08/1.09, residual 1.11/1.11, spectral 1.05/1.05,
# tpselepedis 1.28/1.32 -- slightly *worse* than one-level KFAC: the additive correction solves
# the coarse problem for g from scratch and adds it to d1, which already holds most of that
# component (counted twice). Koroko et al. 2023 measured this error in their code and found the
# two-level directions no better than KFAC's.
# With the exact coarse operator the multiplicative form is the Â-orthogonal projection of the
# one-level error onto span(R0^T): never worse, and the new residual is ⊥ span(R0^T). The
# Tselepidis coarse operator (cross-Kronecker approximation F_ij ≈ G_ij ⊗ A_ij) has no such
# guarantee and on this problem makes the direction worse than one-level KFAC.
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("space", SPACES)
def test_error_reduction_vs_one_level(problem, space, krylov, form):
    d, info = run(problem, space, krylov, form=form)
    e1, e2 = anorm(problem, info["one_level"]), anorm(problem, d)
    ratio = e2 / e1
    print(f"{form:14s} {space:12s} krylov={krylov!s:5s} A-norm error ratio two-level/one-level = {ratio:.4f}")
    if form == "additive":
        assert 1.0 < ratio < 1.5  # recorded above: no gain on this problem
    elif space != "tpselepedis":
        assert ratio <= 1.0 + 1e-12
        r_new = problem["gvec"] - problem["Ahat"] @ problem["cat"](d)
        torch.testing.assert_close(info["basis"].dense() @ r_new, torch.zeros(info["coarse_dim"], dtype=r_new.dtype), atol=1e-10, rtol=0)
        assert ratio < 0.999  # strict reduction on this problem
    else:
        assert 1.0 < ratio < 5.0


def test_residual_space_is_best_here(problem):
    ratios = {s: anorm(problem, run(problem, s, False, form="multiplicative")[0]) for s in SPACES}
    assert min(ratios, key=ratios.get) == "residual"


@pytest.mark.parametrize("form", FORMS)
def test_batched_fisher_and_single_callable_precond(problem, form):
    d_ref, info_ref = run(problem, "nicolaides", True, form=form)

    def precond_all(xs):
        return [P(x) for P, x in zip(problem["precond"], xs)]

    d, info = two_level_direction(problem["g"], precond_all, problem["fisher_mvp_batched"], LAM,
                                  coarse_space="nicolaides", krylov=True, batched=True, form=form)
    for a, b in zip(d, d_ref):
        torch.testing.assert_close(a, b)
    # multiplicative: one residual product; then 1 batched call for all coarse columns
    extra = 1 if form == "multiplicative" else 0
    assert info["fisher_products"] == extra + 1
    assert info_ref["fisher_products"] == extra + 2 * 4


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
    with pytest.raises(ValueError, match="form must be one of"):
        run(problem, "nicolaides", False, form="balanced")
    with pytest.raises(ValueError, match="needs precond="):
        coarse_basis(problem["g"], "nicolaides", krylov=True)
    neg = lambda xs: [-t for t in problem["fisher_mvp"](xs)]
    with pytest.raises(ValueError, match="coarse matrix .* not positive definite"):
        two_level_direction(problem["g"], problem["precond"], neg, LAM)


def test_spectral_krylov_adds_nothing_in_float32():
    """``z_l`` is an eigenvector of ``P_l``: ``P_l z_l - <P_l z_l, z_l> z_l`` is round-off and must
    not become a (noise) column, in float32 too."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(50, 5, generator=gen)
    G = torch.randn(50, 4, generator=gen)
    factors = [[G.T @ G / 50, A.T @ A / 50]]
    P = KroneckerInverse(factors[0], 1e-3, "pi")
    g = [torch.randn(4, 5, generator=gen)]
    basis = coarse_basis(g, "spectral", factors=factors, krylov=True, precond=[P])
    assert len(basis) == 1
    nic = coarse_basis(g, "nicolaides", krylov=True, precond=[P])
    assert len(nic) == 2


@pytest.mark.parametrize("form", FORMS)
def test_float64_preconditioner_with_float32_gradient(problem, form):
    """The optimizer rebuilds a failed float32 inverse in float64: its directions must be cast
    back before the float32 Fisher product (a dtype error at step 50 of a CNN run, once)."""
    g = [t.float() for t in problem["g"]]
    F32 = problem["F"].float()
    sizes = [math.prod(s) for s in SHAPES]

    def mvp(xs):
        v = torch.cat([t.reshape(-1) for t in xs])
        return [t.reshape(s) for t, s in zip(torch.split(F32 @ v, sizes), SHAPES)]

    precond64 = [lambda t, P=P: P(t.double()) for P in problem["precond"]]
    d, info = two_level_direction(g, precond64, mvp, LAM, coarse_space="residual", krylov=True, form=form)
    assert all(t.dtype == torch.float32 for t in d)
    d_ref, _ = run(problem, "residual", True, form=form)
    err = problem["cat"]([a.double() for a in d]) - problem["cat"](d_ref)
    assert float(err.norm() / problem["cat"](d_ref).norm()) < 1e-2  # float32 round-off (r cancels)


def test_krylov_keeps_a_small_but_real_second_direction_in_float32():
    """``P_l z_l`` with an orthogonal part of ~15% of its norm is a real Krylov vector (a tolerance
    of 1e3 sqrt(eps) = 0.35 once dropped it, and most Krylov vectors of the CNN run with it)."""
    gen = torch.Generator().manual_seed(0)
    scale = 1 + 0.3 * (2 * torch.rand(6, 5, generator=gen) - 1)
    g = [torch.randn(6, 5, generator=gen)]
    basis = coarse_basis(g, "nicolaides", krylov=True, precond=[lambda t: scale * t])
    assert len(basis) == 2
    w = scale.reshape(-1) - scale.mean()  # P 1 minus its projection on 1, up to normalisation
    torch.testing.assert_close(basis.vectors[1].reshape(-1), w / w.norm(), rtol=1e-4, atol=1e-5)
