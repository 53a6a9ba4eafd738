import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvlib.solvers import cg, flatten_list, from_scipy, to_scipy, unflatten

SHAPES = [(3, 2), (4,), (2, 2)]


@pytest.fixture
def dense(gen, spd):
    return spd(14, gen)


def list_op(M):
    return lambda xs: unflatten(M @ flatten_list(xs), SHAPES)


def test_flatten_roundtrip(gen):
    xs = [torch.randn(s, generator=gen) for s in SHAPES]
    v = flatten_list(xs)
    assert v.shape == (14,)
    for a, b in zip(unflatten(v, SHAPES), xs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="need a 1-d vector of 14"):
        unflatten(torch.zeros(13), SHAPES)


def test_to_scipy_cg_and_eigsh(dense):
    op = to_scipy(list_op(dense), SHAPES)
    assert op.shape == (14, 14) and op.dtype == np.float64
    b = np.arange(14, dtype=np.float64)
    x, info = spla.cg(op, b, rtol=1e-12, atol=0.0)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(dense.numpy(), b), rtol=1e-8)
    w, V = spla.eigsh(op, k=3, which="LA")
    np.testing.assert_allclose(np.sort(w), np.linalg.eigvalsh(dense.numpy())[-3:], rtol=1e-10)
    np.testing.assert_allclose(op.rmatvec(b), dense.numpy() @ b, rtol=1e-12)
    np.testing.assert_allclose(op.matmat(np.eye(14)[:, :2]), dense.numpy()[:, :2], rtol=1e-12)


def test_to_scipy_single_shape(gen, spd):
    M = spd(6, gen)
    op = to_scipy(lambda X: (M @ X.reshape(-1)).reshape(2, 3), (2, 3))
    np.testing.assert_allclose(op @ np.ones(6), M.numpy() @ np.ones(6), rtol=1e-12)


def test_from_scipy_with_curvlib_cg(dense):
    A = from_scipy(spla.aslinearoperator(dense.numpy()), SHAPES)
    b = [torch.ones(s, dtype=torch.float64) for s in SHAPES]
    xs, info = cg(A, b, tol=1e-12, atol=0.0)
    assert info.converged
    torch.testing.assert_close(flatten_list(xs), torch.linalg.solve(dense, torch.ones(14, dtype=torch.float64)))
    # round trip curvlib -> scipy -> curvlib
    B = from_scipy(to_scipy(list_op(dense), SHAPES), SHAPES)
    torch.testing.assert_close(flatten_list(B(b)), dense @ torch.ones(14, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes hold 14 entries"):
        from_scipy(spla.aslinearoperator(np.eye(3)), SHAPES)
