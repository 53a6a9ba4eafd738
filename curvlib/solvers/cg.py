r"""(Preconditioned) conjugate gradient for SPD operators on tensors or lists of tensors.

Solves ``A x = b`` (Hestenes & Stiefel 1952; preconditioned form: Saad, "Iterative Methods for
Sparse Linear Systems", Alg. 9.1) with ``A`` and ``M ≈ A^-1`` callables on the structure of ``b``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._linalg import check_finite
from .structure import Structure, TensorOrList

__all__ = ["cg", "CGInfo"]


class CGInfo(int):
    """``int`` (the design's ``info``) carrying details.

    Value: the number of iterations used when converged, ``0`` when not converged within
    ``maxiter``. Edge case: an initial guess (``x0``, or ``0`` when ``x0`` is None) that already
    satisfies the stopping rule also gives ``0`` (with ``x = x0``); tell the two apart with
    ``info.converged``. Attributes: ``converged`` (bool), ``iterations`` (int, iterations run),
    ``residual_norm`` (float, ``||b - A x||`` of the recursive residual).
    """

    converged: bool
    iterations: int
    residual_norm: float

    def __new__(cls, value: int, converged: bool, iterations: int, residual_norm: float):
        obj = super().__new__(cls, value)
        obj.converged = converged
        obj.iterations = iterations
        obj.residual_norm = residual_norm
        return obj

    def __repr__(self) -> str:
        return (
            f"CGInfo({int(self)}, converged={self.converged}, iterations={self.iterations}, "
            f"residual_norm={self.residual_norm:.3g})"
        )


def cg(
    A: Callable[[TensorOrList], TensorOrList],
    b: TensorOrList,
    x0: Optional[TensorOrList] = None,
    tol: float = 1e-5,
    atol: float = 1e-8,
    maxiter: Optional[int] = None,
    M: Optional[Callable[[TensorOrList], TensorOrList]] = None,
) -> Tuple[TensorOrList, CGInfo]:
    r"""Solve ``A x = b`` for symmetric positive definite ``A``.

    Args:
        A: callable mapping a tensor / list of tensors shaped like ``b`` to the same structure.
        b: right-hand side, one tensor of any shape or a list of tensors (e.g. one per parameter).
        x0: initial guess shaped like ``b`` (default zeros).
        tol, atol: stop when ``||b - A x|| <= max(tol * ||b||, atol)`` (scipy's rule; the norm is
            over the whole structure, the residual is the recursive CG residual).
        maxiter: maximum number of iterations (default ``10 * n``, ``n`` = total number of entries).
        M: SPD preconditioner ``M(r) ≈ A^-1 r`` on the same structure (e.g. a KFAC inverse).

    Returns:
        ``(x, info)``: ``x`` shaped like ``b``; ``info`` a :class:`CGInfo` (an ``int``): iterations
        used when converged, ``0`` otherwise (and ``0`` if ``x0`` already satisfies the rule —
        check ``info.converged``).

    Raises:
        ValueError: non-finite ``b``/``x0``/operator output, ``p^T A p <= 0`` (``A`` not SPD) or
            ``r^T M r <= 0`` (``M`` not SPD), shape mismatches.
    """
    s = Structure.of(b, "b")
    bv = s.flatten(b, "b")
    check_finite(bv, "cg: right-hand side b")
    n = bv.numel()
    if maxiter is None:
        maxiter = 10 * n
    matvec = s.wrap(A, "A")
    precond = s.wrap(M, "M") if M is not None else None

    if x0 is None:
        x = torch.zeros_like(bv)
        r = bv.clone()
    else:
        x = s.flatten(x0, "x0").clone().to(bv.dtype)
        check_finite(x, "cg: initial guess x0")
        Ax = matvec(x)
        check_finite(Ax, "cg: A(x0)", "the operator A returned NaN/Inf")
        r = bv - Ax

    thresh = max(tol * float(torch.linalg.vector_norm(bv)), atol)
    rnorm = float(torch.linalg.vector_norm(r))
    if rnorm <= thresh:
        return s.unflatten(x), CGInfo(0, True, 0, rnorm)

    def apply_m(r: Tensor, it: int) -> Tuple[Tensor, float]:
        if precond is None:
            return r, float(r @ r)
        z = precond(r)
        check_finite(z, "cg: preconditioner output M(r)", "the preconditioner returned NaN/Inf")
        rz = float(r @ z)
        if not rz > 0:
            raise ValueError(
                f"cg: the preconditioner M is not positive definite (r^T M r = {rz:.3g} at iteration {it}); "
                "M must be SPD — check its damping."
            )
        return z, rz

    z, rz = apply_m(r, 0)
    p = z.clone()
    for it in range(1, maxiter + 1):
        Ap = matvec(p)
        check_finite(Ap, "cg: operator output A(p)", "the operator A returned NaN/Inf")
        pAp = float(p @ Ap)
        if not pAp > 0:
            raise ValueError(
                f"cg: non-SPD curvature, p^T A p = {pAp:.3g} <= 0 at iteration {it}; A must be symmetric "
                "positive definite — add damping (e.g. A + λI) or use a PSD curvature (GGN/Fisher)."
            )
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rnorm = float(torch.linalg.vector_norm(r))
        if rnorm <= thresh:
            return s.unflatten(x), CGInfo(it, True, it, rnorm)
        z, rz_new = apply_m(r, it)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return s.unflatten(x), CGInfo(0, False, maxiter, rnorm)
