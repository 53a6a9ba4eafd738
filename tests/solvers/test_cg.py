import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvlib.solvers import KroneckerInverse, cg


def test_spd_vs_solve(gen, spd):
    A = spd(20, gen)
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    x, info = cg(lambda v: A @ v, b, tol=1e-12, atol=0.0)
    assert info > 0 and info.converged and int(info) == info.iterations
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_stopping_rule_and_info(gen, spd):
    A = spd(30, gen, shift=1e-3)
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    tol, atol = 1e-6, 1e-9
    x, info = cg(lambda v: A @ v, b, tol=tol, atol=atol)
    assert info.converged and info >= 1
    assert torch.linalg.norm(b - A @ x) <= 1.01 * max(tol * torch.linalg.norm(b), atol)
    # one iteration fewer does not satisfy the rule
    x2, info2 = cg(lambda v: A @ v, b, tol=tol, atol=atol, maxiter=int(info) - 1)
    assert info2 == 0 and not info2.converged and info2.iterations == int(info) - 1
    assert torch.linalg.norm(b - A @ x2) > max(tol * torch.linalg.norm(b), atol)
    # an initial guess that already satisfies the rule: info 0, converged, x = x0
    x3, info3 = cg(lambda v: A @ v, b, x0=x, tol=1e-3)
    assert info3 == 0 and info3.converged and info3.iterations == 0
    torch.testing.assert_close(x3, x)
    # b = 0: x = 0 with info 0
    x4, info4 = cg(lambda v: A @ v, torch.zeros(30, dtype=torch.float64))
    assert info4 == 0 and info4.converged and torch.count_nonzero(x4) == 0
    # atol dominates when tol = 0
    x5, info5 = cg(lambda v: A @ v, b, tol=0.0, atol=1e-3)
    assert torch.linalg.norm(b - A @ x5) <= 1e-3 * 1.01


def test_list_of_tensors_and_x0(gen, spd):
    shapes = [(3, 4), (5,), (2, 2, 2)]
    n = 12 + 5 + 8
    A = spd(n, gen)

    def op(xs):
        y = A @ torch.cat([t.reshape(-1) for t in xs])
        return [p.reshape(s) for p, s in zip(torch.split(y, [12, 5, 8]), shapes)]

    bs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    xs, info = cg(op, bs, x0=x0, tol=1e-12, atol=0.0)
    assert info.converged and isinstance(xs, list) and [t.shape for t in xs] == [torch.Size(s) for s in shapes]
    ref = torch.linalg.solve(A, torch.cat([t.reshape(-1) for t in bs]))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in xs]), ref, rtol=1e-9, atol=1e-10)
    # tensor b of matrix shape
    B = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A25 = spd(25, gen)
    X, info = cg(lambda V: (A25 @ V.reshape(-1)).reshape(5, 5), B, tol=1e-12, atol=0)
    torch.testing.assert_close(X.reshape(-1), torch.linalg.solve(A25, B.reshape(-1)), rtol=1e-9, atol=1e-10)


def test_preconditioned_fewer_iterations(gen, spd):
    # ill-conditioned Kronecker-structured SPD matrix plus a small perturbation
    out, inn = 8, 6
    QG = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(inn, inn, generator=gen, dtype=torch.float64))[0]
    G = QG @ torch.diag(torch.logspace(-3, 1, out, dtype=torch.float64)) @ QG.T
    A = QA @ torch.diag(torch.logspace(-2, 1, inn, dtype=torch.float64)) @ QA.T
    E = torch.randn(out * inn, out * inn, generator=gen, dtype=torch.float64)
    lam = 1e-4
    K = torch.kron(G, A) + 1e-4 * (E @ E.T) / (out * inn) + lam * torch.eye(out * inn, dtype=torch.float64)
    b = torch.randn(out, inn, generator=gen, dtype=torch.float64)
    op = lambda V: (K @ V.reshape(-1)).reshape(out, inn)
    P = KroneckerInverse([[G, A]], lam)
    x_plain, info_plain = cg(op, b, tol=1e-8, atol=0.0)
    x_pre, info_pre = cg(op, b, tol=1e-8, atol=0.0, M=P)
    assert info_plain.converged and info_pre.converged
    assert int(info_pre) < int(info_plain) / 3, (int(info_pre), int(info_plain))
    ref = torch.linalg.solve(K, b.reshape(-1)).reshape(out, inn)
    for x in (x_plain, x_pre):
        assert torch.linalg.norm(K @ (x - ref).reshape(-1)) <= 1.01e-8 * torch.linalg.norm(b)


def test_agrees_with_scipy(gen, spd):
    A = spd(40, gen, shift=1e-2)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    x, info = cg(lambda v: A @ v, b, tol=1e-10, atol=0.0)
    xs, sinfo = spla.cg(A.numpy(), b.numpy(), rtol=1e-10, atol=0.0)
    assert sinfo == 0 and info.converged
    np.testing.assert_allclose(x.numpy(), xs, rtol=1e-7, atol=1e-9)


def test_errors(gen, spd):
    A = spd(6, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="right-hand side b contains NaN or Inf"):
        cg(lambda v: A @ v, torch.full((6,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"non-SPD curvature, p\^T A p"):
        cg(lambda v: -(A @ v), b)
    with pytest.raises(ValueError, match="preconditioner M is not positive definite"):
        cg(lambda v: A @ v, b, M=lambda r: -r)
    with pytest.raises(ValueError, match="operator A returned NaN"):
        cg(lambda v: v * float("nan"), b)
    with pytest.raises(ValueError, match="output of A has shape"):
        cg(lambda v: v[:3], b)
    with pytest.raises(TypeError, match="b must be a tensor"):
        cg(lambda v: v, 3.0)


def test_batched_list_of_tensors(gen, spd):
    """batch_dims with a list structure: system b is (W[b], c[b]); the operator acts per system."""
    A = spd(7, gen)
    Bsz = 4

    def op(xs):
        W, c = xs  # [B, 2, 3], [B, 1]
        y = torch.cat([W.reshape(Bsz, 6), c], dim=1) @ A  # A symmetric: row-wise A @ x
        return [y[:, :6].reshape(Bsz, 2, 3), y[:, 6:]]

    bs = [torch.randn(Bsz, 2, 3, generator=gen, dtype=torch.float64), torch.randn(Bsz, 1, generator=gen, dtype=torch.float64)]
    xs, info = cg(op, bs, tol=1e-12, atol=0.0, batch_dims=1)
    assert info.converged and [t.shape for t in xs] == [t.shape for t in bs]
    flat = torch.cat([xs[0].reshape(Bsz, 6), xs[1]], dim=1)
    ref = torch.linalg.solve(A, torch.cat([bs[0].reshape(Bsz, 6), bs[1]], dim=1).T).T
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-10)


def test_batched_errors(gen, spd):
    A = spd(3, gen)
    with pytest.raises(ValueError, match="share the leading batch shape"):
        cg(lambda xs: xs, [torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)], batch_dims=1)
    with pytest.raises(ValueError, match="batch_dims must be an int >= 0"):
        cg(lambda v: v, torch.ones(3, dtype=torch.float64), batch_dims=-1)
    with pytest.raises(ValueError, match="non-SPD curvature"):  # only the second system is indefinite
        M = torch.stack([A, -A])
        cg(lambda X: (M @ X[..., None])[..., 0], torch.ones(2, 3, dtype=torch.float64), batch_dims=1)


def test_negative_curvature_stop_reports_and_returns_iterate():
    """Indefinite A: 'raise' (default) refuses; 'stop' returns b at a first-iteration stop and
    the CG iterate reached so far otherwise, with info.negative_curvature."""
    A = torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64))
    b = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # first direction has p^T A p < 0
    with pytest.raises(ValueError, match="non-SPD"):
        cg(lambda v: A @ v, b)
    x, info = cg(lambda v: A @ v, b, negative_curvature="stop")
    assert info.negative_curvature and not info.converged and int(info) == 0
    assert torch.equal(x, b)
    b2 = torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64)  # positive at first, negative later
    x2, info2 = cg(lambda v: A @ v, b2, negative_curvature="stop", tol=1e-14, atol=0.0)
    assert info2.negative_curvature and info2.iterations >= 2
    r0 = b2 @ b2 / (b2 @ A @ b2)  # the first iterate (Cauchy point) lowers the quadratic model
    q = lambda v: 0.5 * v @ A @ v - b2 @ v
    assert q(x2) <= q(r0 * b2) + 1e-12
    # SPD systems are unaffected
    S = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    x3, info3 = cg(lambda v: S @ v, b2, negative_curvature="stop", tol=1e-14, atol=0.0)
    assert info3.converged and not info3.negative_curvature
    torch.testing.assert_close(x3, torch.linalg.solve(S, b2))
