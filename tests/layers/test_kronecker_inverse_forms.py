"""KroneckerInverse on diagonal (1-D) and block-form ([B, m, m]) factors against dense inverses."""
import math

import pytest
import torch

from curvlib.solvers import KroneckerInverse

pytestmark = pytest.mark.usefixtures("float64")


def spd(*shape):
    X = torch.randn(*shape[:-1], shape[-1], 2 * shape[-1])
    return X @ X.mT / shape[-1]


def dense(F):
    if F.dim() == 1:
        return torch.diag(F)
    if F.dim() == 3:
        return torch.block_diag(*F)
    return F


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("forms", [("diag", "dense"), ("dense", "diag"), ("diag", "diag")])
def test_diagonal_factor(mode, forms):
    m, n, lam = 5, 3, 0.1
    G = torch.rand(m) + 0.1 if forms[0] == "diag" else spd(m)
    A = torch.rand(n) + 0.1 if forms[1] == "diag" else spd(n)
    P = KroneckerInverse([[G, A]], lam, mode)
    V = torch.randn(4, m, n)
    Gd, Ad = dense(G), dense(A)
    if mode == "exact":
        M = torch.kron(Gd, Ad) + lam * torch.eye(m * n)
    else:
        pi = math.sqrt((Ad.trace() / n) / (Gd.trace() / m))
        M = torch.kron(Gd + math.sqrt(lam) / pi * torch.eye(m), Ad + pi * math.sqrt(lam) * torch.eye(n))
    ref = torch.linalg.solve(M, V.reshape(4, -1).T).T.reshape(V.shape)
    torch.testing.assert_close(P(V), ref)
    torch.testing.assert_close(P(V[0]), ref[0])
    torch.testing.assert_close(P.damped_matrix(), M)


def test_diagonal_factor_is_never_densified():
    """An Embedding-sized diagonal factor (V = 50,000) with a small dense one."""
    Vv, D = 50_000, 16
    A, G = torch.rand(Vv) + 0.01, spd(D)
    P = KroneckerInverse([A, G], 1e-3)
    X = torch.randn(Vv, D)
    Y = P(X)
    # check a few rows against the per-row dense solve: row v is (A_v G + lam I)^-1 x_v
    for v in (0, 7, Vv - 1):
        torch.testing.assert_close(Y[v], torch.linalg.solve(A[v] * G + 1e-3 * torch.eye(D), X[v]))


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_block_form(mode):
    B, m, n, lam = 3, 4, 2, 0.05
    G, A = spd(B, m), spd(B, n)
    P = KroneckerInverse([[G, A]], lam, mode)
    V = torch.randn(5, B * m, n)
    blocks = []
    for b in range(B):
        if mode == "exact":
            blocks.append(torch.kron(G[b], A[b]) + lam * torch.eye(m * n))
        else:
            pi = math.sqrt((A[b].trace() / n) / (G[b].trace() / m))
            blocks.append(torch.kron(G[b] + math.sqrt(lam) / pi * torch.eye(m), A[b] + pi * math.sqrt(lam) * torch.eye(n)))
    M = torch.block_diag(*blocks)
    ref = torch.linalg.solve(M, V.reshape(5, -1).T).T.reshape(V.shape)
    torch.testing.assert_close(P(V), ref)
    torch.testing.assert_close(P(V[1]), ref[1])
    torch.testing.assert_close(P.damped_matrix(), M)
    # each block equals the one-term inverse of that block
    for b in range(B):
        Pb = KroneckerInverse([[G[b], A[b]]], lam, mode)
        torch.testing.assert_close(P(V[0])[b * m:(b + 1) * m], Pb(V[0, b * m:(b + 1) * m]))


def _sym(*shape, scale=0.3):
    X = torch.randn(*shape[:-1], shape[-1], shape[-1])
    return scale * (X + X.mT)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("second", ["psd", "indefinite"])
def test_two_term_block_form(mode, second):
    """Rank-2 KPSVD / KFACCorrected terms of a grouped layer: every block's two-term sum inverted,
    against the dense block-diagonal matrix (pi mode: per-block pi damping of the first term; an
    indefinite sum is clipped at the damping floor per block, exactly like the dense two-term
    inverse of that block)."""
    B, m, n, lam = 3, 4, 3, 0.05
    G1, A1 = spd(B, m), spd(B, n)
    G2, A2 = (spd(B, m), spd(B, n)) if second == "psd" else (_sym(B, m), _sym(B, n))
    P = KroneckerInverse([[G1, A1], [G2, A2]], lam, mode)
    V = torch.randn(5, B * m, n)
    if mode == "exact" and second == "indefinite":  # exact means exact: refused, never clipped
        with pytest.raises(ValueError, match="non-SPD"):
            P(V)
        return
    blocks = []
    for b in range(B):
        one = KroneckerInverse([[G1[b], A1[b]], [G2[b], A2[b]]], lam, mode)  # the dense 2-D inverse
        blocks.append(one.damped_matrix())
        torch.testing.assert_close(P(V)[:, b * m:(b + 1) * m], one(V[:, b * m:(b + 1) * m]))
        if mode == "exact":
            ref_b = torch.kron(G1[b], A1[b]) + torch.kron(G2[b], A2[b]) + lam * torch.eye(m * n)
            torch.testing.assert_close(blocks[-1], ref_b)
        elif second == "psd":
            pi = math.sqrt((A1[b].trace() / n) / (G1[b].trace() / m))
            s = math.sqrt(lam)
            ref_b = torch.kron(G1[b] + s / pi * torch.eye(m), A1[b] + s * pi * torch.eye(n)) + torch.kron(G2[b], A2[b])
            torch.testing.assert_close(blocks[-1], ref_b)
    M = torch.block_diag(*blocks)
    torch.testing.assert_close(P.damped_matrix(), M)
    ref = torch.linalg.solve(M, V.reshape(5, -1).T).T.reshape(V.shape)
    torch.testing.assert_close(P(V), ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(P(V[2]), ref[2], rtol=1e-7, atol=1e-9)
    if mode == "pi" and second == "indefinite":
        assert P.clipped > 0  # the case exercises the per-block floor


@pytest.mark.parametrize("form", ["diag", "block"])
def test_bias_forms(form):
    lam = 0.2
    G = torch.rand(6) + 0.1 if form == "diag" else spd(2, 3)
    P = KroneckerInverse([G], lam)
    v = torch.randn(7, 6)
    M = dense(G) + lam * torch.eye(6)
    torch.testing.assert_close(P(v), torch.linalg.solve(M, v.T).T)
    torch.testing.assert_close(P.damped_matrix(), M)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("forms", ["diag-dense/dense-dense", "diag-dense/diag-dense", "dense-diag/dense-dense",
                                   "dense-dense/dense-diag", "diag-diag/dense-dense", "diag-dense/dense-diag"])
def test_two_terms_with_diagonal_factors(mode, forms):
    """Two terms with 1-D factors (a tied Embedding / Linear weight's KFAC: ``[[A_emb [V], G_emb],
    [G_lin, A_lin]]``; with both vocabulary factors 1-D, block-diagonal) against the dense inverse:
    ``"exact"`` of ``sum + λI``, ``"pi"`` of ``kron(F11 + √λ/π I, F12 + π√λ I) + kron(F21, F22)``
    with ``π`` from the first term."""
    m, n = 6, 4
    kinds = [k for t in forms.split("/") for k in t.split("-")]
    F = [torch.rand(d) + 0.05 * (i == 0) if k == "diag" else spd(d) for i, (k, d) in enumerate(zip(kinds, (m, n, m, n)))]
    D = [dense(f) for f in F]
    V = torch.randn(3, m, n)
    for lam in (1e-3, 0.3):
        P = KroneckerInverse([F[:2], F[2:]], lam, mode)
        if mode == "exact":
            M = torch.kron(D[0], D[1]) + torch.kron(D[2], D[3]) + lam * torch.eye(m * n)
        else:
            pi = math.sqrt((D[1].trace() / n) / (D[0].trace() / m))
            assert P.pi == pytest.approx(pi)
            s = math.sqrt(lam)
            M = torch.kron(D[0] + s / pi * torch.eye(m), D[1] + s * pi * torch.eye(n)) + torch.kron(D[2], D[3])
        ref = torch.linalg.solve(M, V.reshape(3, -1).T).T.reshape(V.shape)
        torch.testing.assert_close(P(V), ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(P.damped_matrix(), M)


def test_two_terms_diagonal_side_forms_nothing_dense(monkeypatch):
    """Both vocabulary-side factors 1-D ("pi"): the simultaneous diagonalization of that side is the
    diagonal ``diag(F11 + c)^{-1/2}``, no ``m x m`` eigendecomposition (only the dense side's)."""
    import curvlib.solvers.kronecker as kron

    m, n = 50, 3
    sizes = []
    real = kron.safe_eigh

    def counted(M, name):
        sizes.append(M.shape[-1])
        return real(M, name)

    monkeypatch.setattr(kron, "safe_eigh", counted)
    P = KroneckerInverse([[torch.rand(m), spd(n)], [torch.rand(m), spd(n)]], 0.1, "pi")
    assert P._Qg.dim() == 1 and sizes and max(sizes) == n


def test_bad_forms_refused():
    with pytest.raises(ValueError, match="block"):
        KroneckerInverse([[torch.rand(6), spd(2)], [spd(2, 3), spd(2, 2)]], 0.1)
    with pytest.raises(ValueError, match="block"):
        KroneckerInverse([[spd(2, 3), spd(2)]], 0.1)
    with pytest.raises(ValueError, match="same number of blocks"):
        KroneckerInverse([[spd(2, 3), spd(3, 2)]], 0.1)
    with pytest.raises(ValueError, match="non-SPD"):
        KroneckerInverse([[torch.tensor([1.0, 0.0]), spd(2)]], 0.0)


@pytest.mark.parametrize("forms", ["dense", "diag-dense", "dense-diag", "block", "two-dense", "two-block",
                                   "bias-dense", "bias-diag", "bias-block"])
def test_kron_matvec_against_dense(forms):
    """``kron_matvec`` (the optimizers' undamped curvature products) on every factor form."""
    from curvlib.solvers import kron_matvec

    B, m, n = 2, 3, 4
    if forms.startswith("bias"):
        G = {"bias-dense": spd(m * B), "bias-diag": torch.rand(m * B), "bias-block": spd(B, m)}[forms]
        v = torch.randn(5, m * B)
        torch.testing.assert_close(kron_matvec([G], v), v @ dense(G).T)
        torch.testing.assert_close(kron_matvec([[G], [G]], v[0]), 2 * dense(G) @ v[0])
        return
    terms = {
        "dense": [[spd(m), spd(n)]],
        "diag-dense": [[torch.rand(m), spd(n)]],
        "dense-diag": [[spd(m), torch.rand(n)]],
        "block": [[spd(B, m), spd(B, n)]],
        "two-dense": [[spd(m), spd(n)], [_sym(m), _sym(n)]],
        "two-block": [[spd(B, m), spd(B, n)], [_sym(B, m), _sym(B, n)]],
    }[forms]
    rows = B * m if forms.endswith("block") else m
    M = 0
    for G, A in terms:
        if G.dim() == 3:
            M = M + torch.block_diag(*[torch.kron(g, a) for g, a in zip(G, A)])
        else:
            M = M + torch.kron(dense(G), dense(A))
    V = torch.randn(5, rows, n)
    torch.testing.assert_close(kron_matvec(terms, V), (V.reshape(5, -1) @ M.T).reshape(V.shape))
    torch.testing.assert_close(kron_matvec(terms[0] if len(terms) == 1 else terms, V[1]), (M @ V[1].reshape(-1)).reshape(rows, n))


@pytest.mark.parametrize("form", ["block", "dense", "diag", "two-block"])
def test_pi_damping_of_a_zero_factor_is_the_damped_zero_block(form):
    """A zero factor (a dead ReLU channel ahead of a depthwise convolution zeroes its group's A)
    makes its Kronecker term zero: "pi" damping then inverts λ I on that block (π = 1, both factors
    zeroed: the limit of the π rule), the other blocks as usual. It raised "pi needs positive mean
    traces" and the optimizers died after their retries."""
    lam, m, n = 0.05, 3, 4
    if form in ("block", "two-block"):
        G, A = spd(3, m), spd(3, n)
        A[1] = 0.0
        terms = [[G, A]] if form == "block" else [[G, A], [spd(3, m), spd(3, n)]]
    elif form == "dense":
        terms = [[spd(m), torch.zeros(n, n)]]
    else:
        terms = [[torch.zeros(m), spd(n)]]
    P = KroneckerInverse(terms, lam, "pi")
    rows = terms[0][0].shape[:-1].numel() if terms[0][0].dim() > 1 else m
    V = torch.randn(rows, n)
    out = P(V)
    assert torch.isfinite(out).all()
    if form == "block":
        torch.testing.assert_close(out[m:2 * m], V[m:2 * m] / lam)  # the dead group: (λ I)^-1
        for b in (0, 2):  # the others: the one-term pi inverse of that block
            torch.testing.assert_close(out[b * m:(b + 1) * m], KroneckerInverse([[G[b], A[b]]], lam, "pi")(V[b * m:(b + 1) * m]))
    elif form == "two-block":  # the dead group's first term is λ I, the second term stays
        G2, A2 = terms[1][0][1], terms[1][1][1]
        M = torch.kron(G2, A2) + lam * torch.eye(m * n)
        torch.testing.assert_close(out[m:2 * m], torch.linalg.solve(M, V[m:2 * m].reshape(-1)).reshape(m, n))
    else:
        torch.testing.assert_close(out, V / lam)
    torch.testing.assert_close(out, torch.linalg.solve(P.damped_matrix(), V.reshape(-1)).reshape(V.shape))
