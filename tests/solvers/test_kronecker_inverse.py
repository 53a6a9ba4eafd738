import math

import pytest
import torch

from curvlib.solvers import KroneckerInverse


def dense_solve(M, V):
    """solve M x = vec_row(V) for V [out, in] or [B, out, in]."""
    flat = V.reshape(-1, M.shape[0]).T
    return torch.linalg.solve(M, flat).T.reshape(V.shape)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("batched", [False, True])
def test_one_term_vs_dense(gen, spd, mode, batched):
    G, A, lam = spd(4, gen), spd(3, gen), 0.05
    V = torch.randn((5, 4, 3) if batched else (4, 3), generator=gen, dtype=torch.float64)
    P = KroneckerInverse([[G, A]], lam, damping_mode=mode)
    if mode == "exact":
        M = torch.kron(G, A) + lam * torch.eye(12, dtype=torch.float64)
    else:
        pi = math.sqrt((A.trace() / 3) / (G.trace() / 4))
        assert P.pi == pytest.approx(pi)
        s = math.sqrt(lam)
        M = torch.kron(G + s / pi * torch.eye(4, dtype=G.dtype), A + s * pi * torch.eye(3, dtype=A.dtype))
        # the factored form of the design: (G + √λ/π I)^-1 V (A + π√λ I)^-1
        ref = torch.linalg.solve(G + s / pi * torch.eye(4, dtype=G.dtype), V) @ torch.linalg.inv(
            A + s * pi * torch.eye(3, dtype=A.dtype)
        )
        torch.testing.assert_close(P(V), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(P.damped_matrix(), M)
    torch.testing.assert_close(P(V), dense_solve(M, V), rtol=1e-10, atol=1e-12)


def test_unnested_single_term_and_update(gen, spd):
    G, A = spd(3, gen), spd(2, gen)
    V = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    P = KroneckerInverse([G, A], 0.1)  # p.kfac layout
    torch.testing.assert_close(P(V), dense_solve(torch.kron(G, A) + 0.1 * torch.eye(6, dtype=G.dtype), V))
    G2 = spd(3, gen)
    P.update([[G2, A]], 0.3)
    torch.testing.assert_close(P(V), dense_solve(torch.kron(G2, A) + 0.3 * torch.eye(6, dtype=G.dtype), V))


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_bias(gen, spd, mode):
    G, lam = spd(5, gen), 0.2
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    B = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    P = KroneckerInverse([[G]], lam, damping_mode=mode)
    M = G + lam * torch.eye(5, dtype=G.dtype)
    torch.testing.assert_close(P(v), torch.linalg.solve(M, v))
    torch.testing.assert_close(P(B), torch.linalg.solve(M, B.T).T)


def _two_terms(gen, spd, out=4, inn=3):
    G1, A1 = spd(out, gen), spd(inn, gen)
    # second term: symmetric, indefinite, smaller (like a KPSVD correction term)
    G2 = torch.randn(out, out, generator=gen, dtype=torch.float64)
    A2 = torch.randn(inn, inn, generator=gen, dtype=torch.float64)
    return G1, A1, 0.1 * (G2 + G2.T), 0.1 * (A2 + A2.T)


@pytest.mark.parametrize("batched", [False, True])
def test_two_terms_pi_vs_dense(gen, spd, batched):
    G1, A1, G2, A2 = _two_terms(gen, spd)
    lam = 0.03
    V = torch.randn((6, 4, 3) if batched else (4, 3), generator=gen, dtype=torch.float64)
    P = KroneckerInverse([[G1, A1], [G2, A2]], lam, damping_mode="pi")
    pi, s = P.pi, math.sqrt(lam)
    assert pi == pytest.approx(math.sqrt((A1.trace() / 3) / (G1.trace() / 4)))
    M = torch.kron(G1 + s / pi * torch.eye(4, dtype=G1.dtype), A1 + s * pi * torch.eye(3, dtype=A1.dtype)) + torch.kron(G2, A2)
    torch.testing.assert_close(P.damped_matrix(), M)
    torch.testing.assert_close(P(V), dense_solve(M, V), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batched", [False, True])
def test_two_terms_exact_vs_dense(gen, spd, batched):
    G1, A1, G2, A2 = _two_terms(gen, spd)
    lam = 0.03
    V = torch.randn((6, 4, 3) if batched else (4, 3), generator=gen, dtype=torch.float64)
    P = KroneckerInverse([[G1, A1], [G2, A2]], lam, damping_mode="exact")
    M = torch.kron(G1, A1) + torch.kron(G2, A2) + lam * torch.eye(12, dtype=G1.dtype)
    torch.testing.assert_close(P.damped_matrix(), M)
    torch.testing.assert_close(P(V), dense_solve(M, V), rtol=1e-9, atol=1e-11)


def test_two_terms_reduce_to_one_term(gen, spd):
    """With G2 ⊗ A2 = 0 the two-term modes equal the one-term modes (same λ convention)."""
    G1, A1 = spd(4, gen), spd(3, gen)
    Z4, Z3 = torch.zeros(4, 4, dtype=G1.dtype), torch.zeros(3, 3, dtype=G1.dtype)
    V = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    for mode in ("exact", "pi"):
        two = KroneckerInverse([[G1, A1], [Z4, Z3]], 0.1, damping_mode=mode)(V)
        one = KroneckerInverse([[G1, A1]], 0.1, damping_mode=mode)(V)
        torch.testing.assert_close(two, one, rtol=1e-9, atol=1e-11)


def test_float32_eigh_fallback(gen, spd, monkeypatch):
    G, A, lam = spd(4, gen), spd(3, gen), 0.05
    V = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    orig = torch.linalg.eigh
    calls = {"n": 0}

    def flaky(M, *a, **kw):
        if M.dtype == torch.float32 and calls["n"] == 0:
            calls["n"] += 1
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return orig(M, *a, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        P = KroneckerInverse([[G.float(), A.float()]], lam)
    out = P(V.float())
    assert out.dtype == torch.float32
    ref = dense_solve(torch.kron(G, A) + lam * torch.eye(12, dtype=G.dtype), V)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_float32_nonfinite_eigh_fallback(gen, spd, monkeypatch):
    G, A = spd(3, gen), spd(2, gen)
    orig = torch.linalg.eigh

    def nan_eigh(M, *a, **kw):
        L, Q = orig(M, *a, **kw)
        return (L * float("nan"), Q) if M.dtype == torch.float32 else (L, Q)

    monkeypatch.setattr(torch.linalg, "eigh", nan_eigh)
    with pytest.warns(RuntimeWarning, match="float64"):
        P = KroneckerInverse([[G.float(), A.float()]], 0.1)
    assert torch.isfinite(P(torch.ones(3, 2))).all()


def test_errors(gen, spd):
    G, A = spd(3, gen), spd(2, gen)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="factor G1 contains NaN or Inf"):
        KroneckerInverse([[bad, A]], 0.1)
    P = KroneckerInverse([[G, A]], 0.1)
    with pytest.raises(ValueError, match="input V contains NaN"):
        P(torch.full((3, 2), float("inf"), dtype=G.dtype))
    with pytest.raises(ValueError, match=r"V has shape \(2, 3\)"):
        P(torch.ones(2, 3, dtype=G.dtype))
    with pytest.raises(ValueError, match="non-SPD curvature"):
        KroneckerInverse([[-G, A]], 0.1)  # kron(-G, A) + λI indefinite
    with pytest.raises(ValueError, match="non-negative mean traces"):
        KroneckerInverse([[-G, A]], 0.1, damping_mode="pi")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        KroneckerInverse([[G, A]], -1.0)
    with pytest.raises(ValueError, match="damping_mode"):
        KroneckerInverse([[G, A]], 0.1, damping_mode="tikhonov")
    with pytest.raises(ValueError, match="one or two"):
        KroneckerInverse([[G, A]] * 3, 0.1)
    # two terms whose second term makes the sum indefinite (clipped by default in "pi")
    with pytest.raises(ValueError, match="non-SPD curvature"):
        KroneckerInverse([[G, A], [-10 * G, A]], 0.01, damping_mode="pi", indefinite="raise")
    with pytest.raises(ValueError, match="non-SPD curvature"):  # no damping, no floor
        KroneckerInverse([[G, A], [-10 * G, A]], 0.0, damping_mode="pi")
    with pytest.raises(ValueError, match="indefinite"):
        KroneckerInverse([[G, A]], 0.1, indefinite="ignore")
    with pytest.raises(ValueError, match="non-SPD curvature"):
        KroneckerInverse([[G, A], [-10 * G, A]], 0.01, damping_mode="exact")(torch.ones(3, 2, dtype=G.dtype))


def test_pi_mode_needs_no_eigendecomposition(monkeypatch):
    """'pi' damping inverts the two damped factors by Cholesky (eigh is ~4x slower on CPU);
    the result equals the dense solve, and a non-SPD factor still gets the clear error."""
    import curvlib.solvers.kronecker as kron

    torch.manual_seed(0)
    B = torch.randn(5, 9, dtype=torch.float64)
    G = B @ B.T / 9
    B = torch.randn(7, 11, dtype=torch.float64)
    A = B @ B.T / 11
    V = torch.randn(5, 7, dtype=torch.float64)

    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh called in pi mode")

    monkeypatch.setattr(kron, "safe_eigh", no_eigh)
    P = KroneckerInverse([[G, A]], damping=1e-2, damping_mode="pi")
    want = torch.linalg.solve(P.damped_matrix(), V.flatten()).reshape(5, 7)
    torch.testing.assert_close(P(V), want, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="non-SPD|non-negative mean traces"):
        KroneckerInverse([[G - 10 * torch.eye(5, dtype=torch.float64), A]], damping=1e-2, damping_mode="pi")


def test_bias_inverse_needs_no_eigendecomposition(monkeypatch):
    """A bias factor ``G + λI`` is inverted by Cholesky (dense [m, m] and block [B, m, m]),
    equal to the dense solve; eigh is only the fallback, so an indefinite factor still gets
    the clear non-SPD error."""
    import curvlib.solvers.kronecker as kron

    torch.manual_seed(0)
    X = torch.randn(2, 5, 8, dtype=torch.float64)
    Gb = X @ X.mT / 8  # two blocks
    G = Gb[0]
    v, vb = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)

    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh called for an SPD bias factor")

    monkeypatch.setattr(kron, "safe_eigh", no_eigh)
    for mode in ("exact", "pi"):
        P = KroneckerInverse([[G]], 0.1, damping_mode=mode)
        torch.testing.assert_close(P(v), torch.linalg.solve(P.damped_matrix(), v.T).T, rtol=1e-10, atol=1e-12)
        Pb = KroneckerInverse([[Gb]], 0.1, damping_mode=mode)
        torch.testing.assert_close(Pb(vb), torch.linalg.solve(Pb.damped_matrix(), vb.T).T, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="non-SPD curvature"):
        KroneckerInverse([[G - 10 * torch.eye(5, dtype=torch.float64)]], 0.1)


# ---------------------------------------------------------------- indefinite two-term sums


def _rank2_kpsvd(seed):
    """The best rank-2 Kronecker approximation of a PSD block of 3 samples (4 x 3 weight): its
    second term makes the sum indefinite for this seed (smallest eigenvalue -0.14 of 34)."""
    from curvlib.solvers.kronecker_svd import kronecker_svd_gram

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 1, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(3, 1, 3, generator=g, dtype=torch.float64)
    U, S, V = kronecker_svd_gram(x0, x1, 2)
    root = S.sqrt()[:, None, None]
    return [[G, A] for G, A in zip(U * root, V * root)]


def test_indefinite_rank2_pi_is_clipped_at_the_damping_floor(gen, monkeypatch):
    from curvlib.solvers import kronecker_inverse as ki

    monkeypatch.setattr(ki, "_announced", [False])
    terms, lam = _rank2_kpsvd(1), 1e-3
    (G1, A1), (G2, A2) = terms
    assert torch.linalg.eigvalsh(torch.kron(G1, A1) + torch.kron(G2, A2)).min() < -0.1
    with pytest.raises(ValueError, match="non-SPD curvature"):  # the old behaviour
        KroneckerInverse(terms, lam, damping_mode="pi", indefinite="raise")
    with pytest.warns(RuntimeWarning, match="indefinite"):
        P = KroneckerInverse(terms, lam, damping_mode="pi")
    assert 0 < P.clipped < 12
    M = P.damped_matrix()
    unclipped = torch.kron(P._G1d, P._A1d) + torch.kron(G2, A2)
    # only raised: M - unclipped is PSD, M is SPD
    assert torch.linalg.eigvalsh(M - unclipped).min() > -1e-10
    assert torch.linalg.eigvalsh(M).min() > 0
    # Rayleigh quotients along every Kronecker eigendirection x_i (x) y_j are >= damping
    W = torch.kron(P._Qg, P._Qa)
    q = torch.einsum("ki,kl,li->i", W, M, W) / W.square().sum(0)
    assert q.min() >= lam * (1 - 1e-3)  # (pairs within 0.1% of the floor count as at it)
    V = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(P(V), dense_solve(M, V), rtol=1e-9, atol=1e-11)
    # announced once per process
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KroneckerInverse(terms, lam, damping_mode="pi").clipped == P.clipped


def test_psd_rank2_sums_are_not_changed_by_the_floor(gen, spd):
    V = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    # a PD sum with an indefinite second term
    G1, A1, G2, A2 = _two_terms(gen, spd)
    assert torch.linalg.eigvalsh(torch.kron(G1, A1) + torch.kron(G2, A2)).min() > 0
    assert torch.linalg.eigvalsh(G2).min() < 0 < torch.linalg.eigvalsh(G2).max()
    # a PSD, singular sum: rank-deficient factors whose null spaces meet (quotients exactly λ there)
    B = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    C = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    S, T = torch.diag(torch.tensor([0.5, -0.3], dtype=torch.float64)), torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    singular = [[B @ B.T, C @ C.T], [B @ S @ B.T, C @ T @ C.T]]  # 1 + s t >= 0.4
    for terms in ([[G1, A1], [G2, A2]], singular):
        for lam in (1e-6, 0.03):
            clip = KroneckerInverse(terms, lam, damping_mode="pi")
            ref = KroneckerInverse(terms, lam, damping_mode="pi", indefinite="raise")
            assert clip.clipped == 0
            torch.testing.assert_close(clip(V), ref(V), rtol=0, atol=0)
            (g1, a1), (g2, a2) = terms
            pi, s = ref.pi, math.sqrt(lam)
            M = torch.kron(g1 + s / pi * torch.eye(4, dtype=g1.dtype), a1 + s * pi * torch.eye(3, dtype=a1.dtype)) + torch.kron(g2, a2)
            torch.testing.assert_close(clip(V), dense_solve(M, V), rtol=1e-7, atol=1e-9 * float(dense_solve(M, V).abs().max()))
