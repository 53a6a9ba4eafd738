import pytest
import torch

from curvlib.solvers import woodbury_solve, woodbury_solve_blocks
from curvlib.solvers.woodbury import heuristic_block_damping


def dense(U, g, lam):
    m, d = U.shape
    return torch.linalg.solve(U.T @ U / m + lam * torch.eye(d, dtype=U.dtype), g)


@pytest.mark.parametrize("rhs", ["vector", "matrix"])
def test_woodbury_vs_dense(gen, rhs):
    m, d, lam = 7, 30, 0.05
    U = torch.randn(m, d, generator=gen, dtype=torch.float64)
    g = torch.randn((d,) if rhs == "vector" else (d, 4), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(woodbury_solve(U, g, lam), dense(U, g, lam), rtol=1e-9, atol=1e-11)


def test_woodbury_param_shaped(gen):
    U = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)  # per-sample grads [m, *shape]
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    out = woodbury_solve(U, g, 0.1)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), dense(U.reshape(5, -1), g.reshape(-1), 0.1))


@pytest.mark.parametrize("heuristic", [False, True])
def test_blocks_vs_dense(gen, heuristic):
    m, dims, lam = 6, [10, 4, 15], 0.1
    Us = [torch.randn(m, d, generator=gen, dtype=torch.float64) * s for d, s in zip(dims, [1.0, 5.0, 0.2])]
    gs = [torch.randn(d, generator=gen, dtype=torch.float64) for d in dims]
    out = woodbury_solve_blocks(Us, gs, lam, heuristic_damping=heuristic)
    if heuristic:
        t = torch.stack([(U**2).sum() / (m * U.shape[1]) for U in Us])
        lams = lam * t / t.mean()
        torch.testing.assert_close(heuristic_block_damping(Us, lam), lams)
        assert lams.mean() == pytest.approx(lam)
    else:
        lams = [lam] * 3
    for U, g, o, l in zip(Us, gs, out, lams):
        torch.testing.assert_close(o, dense(U, g, float(l)), rtol=1e-9, atol=1e-11)


def test_errors(gen):
    U = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be > 0"):
        woodbury_solve(U, g, 0.0)
    bad = U.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="U contains NaN or Inf"):
        woodbury_solve(bad, g, 0.1)
    with pytest.raises(ValueError, match="g contains NaN or Inf"):
        woodbury_solve(U, g * float("inf"), 0.1)
    with pytest.raises(ValueError, match="expected \\[d\\] or \\[d, B\\]"):
        woodbury_solve(U, torch.ones(5, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="same number of rows"):
        woodbury_solve_blocks([U, U[:3]], [g, g], 0.1)
