r"""(Preconditioned) conjugate gradient for SPD operators on tensors or lists of tensors.

Solves ``A x = b`` (Hestenes & Stiefel 1952; preconditioned form: Saad, "Iterative Methods for
Sparse Linear Systems", Alg. 9.1) with ``A`` and ``M ≈ A^-1`` callables on the structure of ``b``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._linalg import check_finite
from .structure import BatchedStructure, TensorOrList

__all__ = ["cg", "CGInfo"]


class CGInfo(int):
    """``int`` (the design's ``info``) carrying details.

    Value: the number of iterations used when converged, ``0`` when not converged within
    ``maxiter``. Edge case: an initial guess (``x0``, or ``0`` when ``x0`` is None) that already
    satisfies the stopping rule also gives ``0`` (with ``x = x0``); tell the two apart with
    ``info.converged``. Attributes: ``converged`` (bool), ``iterations`` (int, iterations run),
    ``residual_norm`` (float, ``||b - A x||`` of the recursive residual), ``negative_curvature``
    (bool: some system met ``p^T A p <= 0`` and stopped there, ``negative_curvature="stop"``).
    """

    converged: bool
    iterations: int
    residual_norm: float
    negative_curvature: bool

    def __new__(
        cls, value: int, converged: bool, iterations: int, residual_norm: float, negative_curvature: bool = False
    ):
        obj = super().__new__(cls, value)
        obj.converged = converged
        obj.iterations = iterations
        obj.residual_norm = residual_norm
        obj.negative_curvature = negative_curvature
        return obj

    def __repr__(self) -> str:
        neg = ", negative_curvature=True" if self.negative_curvature else ""
        return (
            f"CGInfo({int(self)}, converged={self.converged}, iterations={self.iterations}, "
            f"residual_norm={self.residual_norm:.3g}{neg})"
        )


def cg(
    A: Callable[[TensorOrList], TensorOrList],
    b: TensorOrList,
    x0: Optional[TensorOrList] = None,
    tol: float = 1e-5,
    atol: float = 1e-8,
    maxiter: Optional[int] = None,
    M: Optional[Callable[[TensorOrList], TensorOrList]] = None,
    *,
    batch_dims: int = 0,
    negative_curvature: str = "raise",
) -> Tuple[TensorOrList, CGInfo]:
    r"""Solve ``A x = b`` for symmetric positive definite ``A``.

    Args:
        A: callable mapping a tensor / list of tensors shaped like ``b`` to the same structure.
        b: right-hand side, one tensor of any shape or a list of tensors (e.g. one per parameter).
        x0: initial guess shaped like ``b`` (default zeros).
        tol, atol: stop when ``||b - A x|| <= max(tol * ||b||, atol)`` (scipy's rule; the norm is
            over the whole structure, the residual is the recursive CG residual).
        maxiter: maximum number of iterations (default ``10 * n``, ``n`` = number of entries of
            one system).
        M: SPD preconditioner ``M(r) ≈ A^-1 r`` on the same structure (e.g. a KFAC inverse).
        batch_dims: the leading ``batch_dims`` dimensions of ``b`` (of every tensor of a list)
            index *independent* systems ``A_i x_i = b_i``, solved together: ``A`` and ``M`` get
            the whole batch ``[*batch, ...]`` and must act on each system separately (e.g.
            ``X -> G X A`` on ``[B, out, in]``). Each system has its own CG scalars and stopping
            rule, and stays fixed once it satisfies it, so the result equals one ``cg`` call per
            system up to round-off.
        negative_curvature: what to do when a search direction has ``p^T A p <= 0`` (``A`` is
            not positive definite, e.g. a damped Hessian): ``"raise"`` (default) a ValueError;
            ``"stop"``: stop that system and return its current iterate (truncated Newton,
            Nocedal & Wright, "Numerical Optimization", Alg. 7.1), or ``b`` itself when this
            happens at the first iteration from a zero start (the steepest-descent direction);
            ``info.negative_curvature`` is then True and ``info == 0`` (not converged).

    Returns:
        ``(x, info)``: ``x`` shaped like ``b``; ``info`` a :class:`CGInfo` (an ``int``): iterations
        used when converged, ``0`` otherwise (and ``0`` if ``x0`` already satisfies the rule —
        check ``info.converged``). Batched: iterations until every system converged, converged
        when all did, ``residual_norm`` the largest over the systems.

    Raises:
        ValueError: non-finite ``b``/``x0``/operator output, ``p^T A p <= 0`` (``A`` not SPD) or
            ``r^T M r <= 0`` (``M`` not SPD), shape mismatches.
    """
    s = BatchedStructure.of(b, batch_dims, "b")
    bv = s.flatten(b, "b")  # [B, n]: one row per system
    check_finite(bv, "cg: right-hand side b")
    n = s.numel
    if maxiter is None:
        maxiter = 10 * n
    matvec = s.wrap(A, "A")
    precond = s.wrap(M, "M") if M is not None else None

    def rownorm(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x, dim=1)

    def rowdot(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum(dim=1)

    if x0 is None:
        x = torch.zeros_like(bv)
        r = bv.clone()
    else:
        x = s.flatten(x0, "x0").clone().to(bv.dtype)
        check_finite(x, "cg: initial guess x0")
        Ax = matvec(x)
        check_finite(Ax, "cg: A(x0)", "the operator A returned NaN/Inf")
        r = bv - Ax

    thresh = torch.clamp(tol * rownorm(bv), min=atol)
    rnorm = rownorm(r)
    active = rnorm > thresh
    if not bool(active.any()):
        return s.unflatten(x), CGInfo(0, True, 0, float(rnorm.max()))

    def apply_m(r: Tensor, active: Tensor, it: int) -> Tuple[Tensor, Tensor]:
        if precond is None:
            return r, rowdot(r, r)
        z = precond(r)
        check_finite(z, "cg: preconditioner output M(r)", "the preconditioner returned NaN/Inf")
        rz = rowdot(r, z)
        bad = active & ~(rz > 0)
        if bool(bad.any()):
            raise ValueError(
                f"cg: the preconditioner M is not positive definite (r^T M r = {float(rz[bad][0]):.3g} at "
                f"iteration {it}); M must be SPD — check its damping."
            )
        return z, rz

    def masked_ratio(num: Tensor, den: Tensor, active: Tensor) -> Tensor:
        """``num / den`` on active systems, 0 on converged ones (which stay fixed)."""
        return torch.where(active, num / torch.where(active, den, torch.ones_like(den)), torch.zeros_like(den))

    z, rz = apply_m(r, active, 0)
    p = z.clone()
    stopped = torch.zeros_like(active)  # systems stopped on negative curvature
    start_zero = x0 is None

    def finish(x: Tensor, it: int, value: int, converged: bool) -> Tuple[TensorOrList, CGInfo]:
        if bool(stopped.any()):
            return s.unflatten(x), CGInfo(0, False, it, float(rnorm.max()), True)
        return s.unflatten(x), CGInfo(value, converged, it, float(rnorm.max()))

    for it in range(1, maxiter + 1):
        Ap = matvec(p)
        check_finite(Ap, "cg: operator output A(p)", "the operator A returned NaN/Inf")
        pAp = rowdot(p, Ap)
        bad = active & ~(pAp > 0)
        if bool(bad.any()) and negative_curvature == "stop":
            if it == 1 and start_zero:
                x = torch.where(bad[:, None], bv, x)
            stopped = stopped | bad
            active = active & ~bad
            if not bool(active.any()):
                return finish(x, it, 0, False)
        elif bool(bad.any()):
            raise ValueError(
                f"cg: non-SPD curvature, p^T A p = {float(pAp[bad][0]):.3g} <= 0 at iteration {it}; A must be "
                "symmetric positive definite — add damping (e.g. A + λI) or use a PSD curvature (GGN/Fisher)."
            )
        alpha = masked_ratio(rz, pAp, active)[:, None]
        x = x + alpha * p
        r = r - alpha * Ap
        rnorm = rownorm(r)
        active = (rnorm > thresh) & ~stopped
        if not bool(active.any()):
            return finish(x, it, it, True)
        z, rz_new = apply_m(r, active, it)
        p = z + masked_ratio(rz_new, rz, active)[:, None] * p
        rz = rz_new
    return finish(x, maxiter, 0, False)
