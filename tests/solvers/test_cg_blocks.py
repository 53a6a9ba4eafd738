"""cg_blocks: systems of different sizes in one CG loop equal one cg() per system (iterates,
iteration counts, convergence, negative-curvature stops) and scipy's CG."""
import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvlib.solvers import CGBlockError, cg, cg_blocks


def _systems(gen, spd):
    """SPD blocks of different shapes: an ill-conditioned one, a well-conditioned one (converges
    earlier), a multiple of I (one iteration), a zero right-hand side (no iteration)."""
    mats = [spd(24, gen, shift=1e-3), spd(5, gen, shift=1.0), 2.5 * torch.eye(6, dtype=torch.float64),
            spd(12, gen, shift=1e-2), spd(3, gen)]
    shapes = [(4, 6), (5,), (2, 3), (3, 2, 2), (3,)]
    bs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    bs[4] = torch.zeros(3, dtype=torch.float64)
    return mats, bs


def _op(Mat, shape, calls=None, i=None):
    def A(v):
        assert v.shape == shape
        if calls is not None:
            calls[i] += 1
        return (Mat @ v.reshape(-1)).reshape(shape)

    return A


def _same(xs, infos, refs, bs):
    for x, info, (xr, ir), b in zip(xs, infos, refs, bs):
        torch.testing.assert_close(x, xr, rtol=1e-10, atol=1e-12)
        assert (int(info), info.iterations, info.converged, info.negative_curvature) == (
            int(ir), ir.iterations, ir.converged, ir.negative_curvature)
        # the recursive residual: equal up to the round-off of the iterations
        assert info.residual_norm == pytest.approx(ir.residual_norm, rel=1e-6, abs=1e-9 * float(b.norm()))


@pytest.mark.parametrize("kw", [dict(tol=1e-10, atol=0.0), dict(tol=1e-1, atol=1e-6), dict(tol=1e-12, atol=0.0, maxiter=4)])
def test_equals_one_cg_per_system(gen, spd, kw):
    mats, bs = _systems(gen, spd)
    calls = [0] * len(bs)
    ops = [_op(M, b.shape, calls, i) for i, (M, b) in enumerate(zip(mats, bs))]
    xs, infos = cg_blocks(ops, bs, **kw)
    _same(xs, infos, [cg(_op(M, b.shape), b, **kw) for M, b in zip(mats, bs)], bs)
    assert calls == [i.iterations for i in infos]  # A_i is called only while system i runs
    its = [i.iterations for i in infos]
    assert its[2] == 1 and its[4] == 0 and infos[4].converged and len(set(its)) >= 3
    if "maxiter" in kw:
        assert not infos[0].converged and infos[0].iterations == 4 and int(infos[0]) == 0


def test_preconditioners_and_initial_guesses_per_system(gen, spd):
    mats, bs = _systems(gen, spd)
    Ms = [lambda r, D=torch.linalg.inv(M): (D @ r.reshape(-1)).reshape(r.shape) if i % 2 == 0 else None
          for i, M in enumerate(mats)]
    Ms = [m if i % 2 == 0 else None for i, m in enumerate(Ms)]
    x0 = [torch.randn(b.shape, generator=gen, dtype=torch.float64) if i in (0, 3) else None for i, b in enumerate(bs)]
    kw = dict(tol=1e-9, atol=0.0)
    xs, infos = cg_blocks([_op(M, b.shape) for M, b in zip(mats, bs)], bs, x0=x0, M=Ms, **kw)
    _same(xs, infos, [cg(_op(M, b.shape), b, x0=x, M=m, **kw) for M, b, x, m in zip(mats, bs, x0, Ms)], bs)
    assert infos[0].iterations == 1  # exact inverse as preconditioner


def test_negative_curvature_stop_per_system(gen, spd):
    """Indefinite blocks (a damped Hessian's) stop on their own, the others run on: a stop at the
    first iteration returns b, a later one the iterate; the same as cg per system."""
    mats = [torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64)),
            torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64)), spd(8, gen)]
    bs = [torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64),
          torch.randn(8, generator=gen, dtype=torch.float64)]
    kw = dict(tol=1e-14, atol=0.0, negative_curvature="stop")
    xs, infos = cg_blocks([_op(M, b.shape) for M, b in zip(mats, bs)], bs, **kw)
    _same(xs, infos, [cg(_op(M, b.shape), b, **kw) for M, b in zip(mats, bs)], bs)
    assert [i.negative_curvature for i in infos] == [True, True, False]
    assert torch.equal(xs[0], bs[0]) and infos[1].iterations >= 2 and infos[2].converged
    with pytest.raises(CGBlockError, match="system 1: non-SPD curvature") as e:  # the default: refuse
        cg_blocks([_op(mats[2], bs[2].shape), _op(mats[1], bs[1].shape)], [bs[2], bs[1]], tol=1e-14, atol=0.0)
    assert e.value.block == 1


def test_agrees_with_scipy(gen, spd):
    mats, bs = _systems(gen, spd)
    xs, infos = cg_blocks([_op(M, b.shape) for M, b in zip(mats, bs)], bs, tol=1e-10, atol=0.0)
    for M, b, x, info in zip(mats[:4], bs[:4], xs, infos):
        xr, flag = spla.cg(M.numpy(), b.reshape(-1).numpy(), rtol=1e-10, atol=0.0)
        assert flag == 0 and info.converged
        np.testing.assert_allclose(x.reshape(-1).numpy(), xr, rtol=1e-7, atol=1e-9)


def test_errors_name_the_system(gen, spd):
    A = spd(4, gen)
    ok = lambda v: A @ v
    b = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(CGBlockError, match="system 2: the operator output A") as e:
        cg_blocks([ok, ok, lambda v: v * float("nan")], b)
    assert e.value.block == 2
    with pytest.raises(CGBlockError, match="system 1: the right-hand side b contains NaN"):
        cg_blocks([ok] * 3, [b[0], torch.full((4,), float("inf"), dtype=torch.float64), b[2]])
    with pytest.raises(CGBlockError, match="system 0: the preconditioner M is not positive definite"):
        cg_blocks([ok] * 3, b, M=[lambda r: -r, None, None])
    with pytest.raises(CGBlockError, match=r"system 1: the output of A has shape \(3,\)"):
        cg_blocks([ok, lambda v: v[:3], ok], b)
    with pytest.raises(ValueError, match="one dtype and device"):
        cg_blocks([ok, ok], [b[0], b[1].float()])
    assert cg_blocks([], []) == ([], [])


def test_shift_is_added_to_every_system(gen, spd):
    """``shift=λ`` solves ``(A_i + λ I) x_i = b_i`` (CG-Newton's damping), including from x0."""
    mats, bs = _systems(gen, spd)
    lam, kw = 0.3, dict(tol=1e-10, atol=0.0)
    x0 = [None, torch.randn(5, generator=gen, dtype=torch.float64), None, None, None]
    xs, infos = cg_blocks([_op(M, b.shape) for M, b in zip(mats, bs)], bs, x0=x0, shift=lam, **kw)
    refs = [cg(_op(M + lam * torch.eye(len(M), dtype=M.dtype), b.shape), b, x0=x, **kw) for M, b, x in zip(mats, bs, x0)]
    _same(xs, infos, refs, bs)
