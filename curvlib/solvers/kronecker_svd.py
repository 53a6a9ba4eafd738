r"""Top singular triplets of a Van Loan rearrangement, as matrices: the SVD driver of KPSVD.

For a symmetric block ``F`` (``d0 d1 x d0 d1``) its rearrangement
``R(F)[(i,k),(a,b)] = F[(i,a),(k,b)]`` (``d0^2 x d1^2``) has the top singular triplets
``(s_i, vec(U_i), vec(V_i))`` that give the best Frobenius approximation
``F ≈ sum_i s_i U_i ⊗ V_i`` (Van Loan & Pitsianis 1993, "Approximation with Kronecker
products"). :func:`kronecker_svd` finds them from the products ``R v`` / ``R^T u`` only (power
iteration with deflation or Golub–Kahan–Lanczos); building those products from per-sample
gradients is :class:`curvlib.extensions.kpsvd.RearrangedBlock`'s job.

Sign convention: the joint sign of ``(U_i, V_i)`` makes the trace of the factor with the larger
``|trace| / ||.||_F`` positive -- for the leading term of a positive semi-definite block both
factors are then PSD.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .lanczos import golub_kahan
from .power import power_iteration_deflation

METHODS = ("power", "deflation", "lanczos")
#: relative size of the seeded random component added to warm/structured starts of the
#: later terms (and of Lanczos), so that no symmetry class of singular vectors is missed
_PERTURB = 1e-2


def kronecker_svd(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    dims: Tuple[int, int],
    rank: int,
    like: Tensor,
    method: str = "power",
    v0: Optional[Tensor] = None,
    maxiter: Optional[int] = None,
    tol: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Top-``rank`` singular triplets of a rearranged operator ``R`` [r0^2, r1^2], as matrices.

    Args:
        matvec, rmatvec: ``R v`` and ``R^T u`` on flat vectors.
        dims: ``(r0, r1)``.
        rank: number of triplets (at most ``min(r0^2, r1^2)``; missing ones are zero).
        like: a tensor with the dtype and device of the products.
        method: ``"power"`` / ``"deflation"`` (:func:`curvlib.solvers.power_iteration_deflation`,
            one power iteration per triplet on the deflated operator) or ``"lanczos"``
            (:func:`curvlib.solvers.golub_kahan`).
        v0: start ``[r1^2, rank]`` (warm start, any column scaling), or ``None``: ``vec(I)`` for the
            first triplet.
        maxiter, tol: passed to the solver (power iteration: ``maxiter`` per triplet, default 200).

    Returns:
        ``(U [rank, r0, r0], S [rank], V [rank, r1, r1])``, ``R ≈ sum_i S_i vec(U_i) vec(V_i)^T``,
        unit Frobenius norms, signs as in the module docstring.
    """
    if method not in METHODS:
        raise ValueError(f"curvlib: KPSVD(method={method!r}) is not one of {METHODS}.")
    r0, r1 = dims
    n = r1 * r1
    k = min(rank, r0 * r0, n)
    dt, dev = like.dtype, like.device

    def noise(cols: int) -> Tensor:  # seeded, unit columns
        gen = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(n, cols, generator=gen, dtype=torch.float64)
        return (z / torch.linalg.vector_norm(z, dim=0)).to(dtype=dt, device=dev)

    if v0 is None:
        start = torch.eye(r1, dtype=dt, device=dev).reshape(n, 1) / math.sqrt(r1)
    else:
        start = v0[:, :k].to(dtype=dt, device=dev)
        start = start / torch.linalg.vector_norm(start, dim=0).clamp_min(torch.finfo(dt).tiny)
    if method == "lanczos":
        # a sum of (approximate) singular vectors spans a nearly invariant Krylov space; the
        # perturbation: the Krylov space of a symmetric start holds no antisymmetric singular vector
        x0 = start.sum(1)
        x0 = x0 + _PERTURB * torch.linalg.vector_norm(x0) * noise(1)[:, 0] if k > 1 else x0
        if dt != torch.float64:
            # Bases in float64, products in `dt`: golub_kahan treats a step whose new vector is
            # below 100 eps ||R|| as a breakdown and does not accept at that step; in float32 a
            # numerically low-rank R (common here: rank <= N) breaks down at every step.
            tol = 1e-4 if tol is None else tol
            matvec = _cast(matvec, dt)
            rmatvec = _cast(rmatvec, dt)
            x0 = x0.double()
        U, S, V = golub_kahan(matvec, rmatvec, x0, k, maxiter=maxiter, tol=tol)
        U, S, V = U.to(dt), S.to(dt), V.to(dt)
    else:
        if start.shape[1] > 1:
            start = start.clone()
            start[:, 1:] += _PERTURB * noise(start.shape[1])[:, 1:]
        x0 = start if start.shape[1] == k else start[:, 0]
        U, S, V = power_iteration_deflation(matvec, rmatvec, x0, k, maxiter=200 if maxiter is None else maxiter, tol=tol)
    U = rearrange(U, "(a b) k -> k a b", a=r0)
    V = rearrange(V, "(a b) k -> k a b", a=r1)
    tu, tv = torch.diagonal(U, dim1=1, dim2=2).sum(1), torch.diagonal(V, dim1=1, dim2=2).sum(1)
    sign = torch.where(tu.abs() >= tv.abs(), tu, tv).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U, V = U * sign[:, None, None], V * sign[:, None, None]
    if k < rank:  # R has fewer than `rank` nonzero singular values
        pad = rank - k
        U = torch.cat([U, U.new_zeros(pad, r0, r0)])
        V = torch.cat([V, V.new_zeros(pad, r1, r1)])
        S = torch.cat([S, S.new_zeros(pad)])
    return U, S.to(dt), V


def _cast(fn: Callable[[Tensor], Tensor], dt: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``fn`` evaluated in ``dt``, input and output in the caller's dtype."""
    return lambda x: fn(x.to(dt)).to(x.dtype)


__all__ = ["kronecker_svd", "METHODS"]
