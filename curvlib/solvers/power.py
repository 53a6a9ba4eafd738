r"""Top-k singular triplets by power iteration with deflation.

Triplet ``i`` is the dominant triplet of the deflated operator
``R_i = R - sum_{j<i} s_j u_j v_j^T`` found by alternating power iteration
``u <- R_i v / ||R_i v||, v <- R_i^T u / ||R_i^T u||`` (Golub & Van Loan, "Matrix Computations",
§8.2 / §7.3; used for the KPSVD terms of Koroko et al. 2022). Convergence rate per iteration:
``(s_{i+1} / s_i)^2``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._linalg import check_finite, make_generator, orthogonalize, random_orthogonal_vector

__all__ = ["power_iteration_deflation"]


def power_iteration_deflation(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    k: int = 1,
    maxiter: int = 500,
    tol: Optional[float] = None,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Top-``k`` singular triplets of ``R`` [m, n] by power iteration on deflated operators.

    Args:
        matvec: ``v [n] -> R v [m]`` on flat vectors.
        rmatvec: ``u [m] -> R^T u [n]`` on flat vectors.
        v0: warm start, ``[n]`` (start of the first triplet; later triplets start from a seeded
            random vector) or ``[n, k]`` (column ``i`` starts triplet ``i``). Each start is
            orthogonalized against the right vectors already found.
        k: number of triplets.
        maxiter: maximum power iterations per triplet (a warning is issued when reached).
        tol: stop triplet ``i`` when ``||R_i^T u - s v|| <= tol * ||R_i^T u||`` with ``u = R_i v / s``
            (default ``sqrt(eps)``: 1.5e-8 in float64, 3.5e-4 in float32).

    Returns:
        ``(U [m, k], S [k], V [n, k])`` (same convention as :func:`golub_kahan`); ``R v_i = s_i u_i``
        holds exactly for the returned ``v_i`` (one final half-step), singular vectors up to sign.
    """
    if not isinstance(v0, Tensor) or v0.dim() not in (1, 2):
        raise ValueError("power_iteration_deflation: v0 must be a tensor [n] or [n, k].")
    if v0.dim() == 2 and v0.shape[1] < k:
        raise ValueError(f"power_iteration_deflation: v0 has {v0.shape[1]} columns but k={k}.")
    if not v0.is_floating_point():
        v0 = v0.to(torch.get_default_dtype())
    check_finite(v0, "power_iteration_deflation: v0")
    n, dt, dev = v0.shape[0], v0.dtype, v0.device
    if not 1 <= k <= n:
        raise ValueError(f"power_iteration_deflation: k must satisfy 1 <= k <= n = {n}, got {k}.")
    tol = float(torch.finfo(dt).eps) ** 0.5 if tol is None else float(tol)
    gen = make_generator(v0, seed)

    def R(x: Tensor) -> Tensor:
        y = matvec(x)
        check_finite(y, "power_iteration_deflation: matvec output", "matvec returned NaN/Inf")
        return y.reshape(-1).to(dt)

    def Rt(y: Tensor) -> Tensor:
        x = rmatvec(y)
        check_finite(x, "power_iteration_deflation: rmatvec output", "rmatvec returned NaN/Inf")
        return x.reshape(-1).to(dt)

    Us, Ss, Vs = [], [], []
    for i in range(k):
        Vp = torch.stack(Vs, 1) if Vs else torch.zeros(n, 0, dtype=dt, device=dev)
        Up = torch.stack(Us, 1) if Us else None
        Sp = torch.stack(Ss) if Ss else None

        def Rd(x: Tensor) -> Tensor:
            y = R(x)
            return y if Up is None else y - Up @ (Sp * (Vp.T @ x))

        def Rdt(y: Tensor) -> Tensor:
            x = Rt(y)
            return x if Up is None else x - Vp @ (Sp * (Up.T @ y))

        start = v0[:, i] if v0.dim() == 2 else (v0 if i == 0 else None)
        if start is not None:
            v, _, nrm = orthogonalize(start.to(dt), Vp)
            v = v / nrm if nrm > 1e-12 * max(float(torch.linalg.vector_norm(start)), 1e-300) else None
        else:
            v = None
        if v is None:
            v = random_orthogonal_vector(Vp, n, gen, v0)
        converged = False
        for _ in range(maxiter):
            u = Rd(v)
            s = float(torch.linalg.vector_norm(u))
            if s == 0.0:  # v in the null space of the deflated operator: R_i is (numerically) zero here
                break
            u = u / s
            w = Rdt(u)
            t = float(torch.linalg.vector_norm(w))
            res = float(torch.linalg.vector_norm(w - s * v))
            v = w / t
            if res <= tol * t:
                converged = True
                break
        if not converged:
            warnings.warn(
                f"power_iteration_deflation: triplet {i + 1}/{k} did not converge to tol={tol:g} in "
                f"{maxiter} iterations (close or zero singular values?); increase maxiter or use golub_kahan.",
                RuntimeWarning,
                stacklevel=2,
            )
        u = Rd(v)
        s = float(torch.linalg.vector_norm(u))
        u = u / s if s > 0 else torch.zeros_like(u)
        Us.append(u)
        Ss.append(torch.tensor(s, dtype=dt, device=dev))
        Vs.append(v)
    return torch.stack(Us, 1), torch.stack(Ss), torch.stack(Vs, 1)
