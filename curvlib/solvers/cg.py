r"""(Preconditioned) conjugate gradient for SPD operators on tensors or lists of tensors.

Solves ``A x = b`` (Hestenes & Stiefel 1952; preconditioned form: Saad, "Iterative Methods for
Sparse Linear Systems", Alg. 9.1) with ``A`` and ``M ≈ A^-1`` callables on the structure of ``b``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._linalg import all_finite, check_finite
from .structure import BatchedStructure, TensorOrList

__all__ = ["cg", "cg_blocks", "CGInfo", "CGBlockError"]


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


class CGBlockError(ValueError):
    """A :func:`cg_blocks` failure in one system; ``block`` is its index."""

    def __init__(self, message: str, block: int):
        super().__init__(message)
        self.block = block


def cg_blocks(
    A: Sequence[Callable[[Tensor], Tensor]],
    b: Sequence[Tensor],
    x0: Optional[Sequence[Optional[Tensor]]] = None,
    tol: float = 1e-5,
    atol: float = 1e-8,
    maxiter: Optional[int] = None,
    M: Optional[Sequence[Optional[Callable[[Tensor], Tensor]]]] = None,
    *,
    negative_curvature: str = "raise",
    shift: float = 0.0,
) -> Tuple[List[Tensor], List[CGInfo]]:
    r"""Solve independent systems ``A_i x_i = b_i`` of *different* sizes with one CG loop.

    The result is ``[cg(A_i, b_i, x0_i, tol, atol, maxiter, M_i, negative_curvature=...)]`` up to
    round-off, each system with its own CG scalars, stopping rule
    ``||b_i - A_i x_i|| <= max(tol ||b_i||, atol)``, iteration count and negative-curvature stop.
    Per iteration, ``A_i`` (and ``M_i``) are called only for the systems still running; all CG
    scalars, updates and tests run on one packed vector ``[sum_i n_i]`` with per-system segment
    sums (a constant number of tensor operations and one host synchronisation per test,
    whatever the number of systems: the per-parameter blocks of a Newton-CG step).

    Args:
        A: one callable per system, ``A[i](v)`` for ``v`` shaped like ``b[i]``.
        b: right-hand sides (one dtype and device).
        x0: initial guesses, one per system (``None`` entries: zeros), or ``None``.
        tol, atol, maxiter: as :func:`cg` (``maxiter=None``: ``10 n_i`` per system).
        M: preconditioners, one per system (``None`` entries: none), or ``None``.
        negative_curvature: ``"raise"`` or ``"stop"``, as :func:`cg`.
        shift: solve ``(A_i + shift I) x_i = b_i`` (e.g. a damping ``λ``), added to all systems'
            products at once.

    Returns:
        ``(xs, infos)``: one solution shaped like ``b[i]`` and one :class:`CGInfo` per system.

    Raises:
        CGBlockError (a ValueError, ``.block`` the system's index): the errors of :func:`cg`.
    """
    L = len(b)
    if L == 0:
        return [], []
    if len(A) != L or (x0 is not None and len(x0) != L) or (M is not None and len(M) != L):
        raise ValueError(f"cg_blocks: got {L} right-hand sides; A, x0 and M need one entry per system.")
    if negative_curvature not in ("raise", "stop"):
        raise ValueError(f"cg_blocks: negative_curvature={negative_curvature!r}; use 'raise' or 'stop'.")
    for i, t in enumerate(b):
        if not isinstance(t, Tensor):
            raise TypeError(f"cg_blocks: b[{i}] must be a tensor, got {type(t).__name__}.")
    dtype, device = b[0].dtype, b[0].device
    if any(t.dtype != dtype or t.device != device for t in b):
        raise ValueError("cg_blocks: all right-hand sides need one dtype and device; solve the others separately.")
    shapes = [t.shape for t in b]
    sizes = [t.numel() for t in b]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    seg = torch.repeat_interleave(torch.arange(L, device=device), torch.tensor(sizes, device=device))
    sl = [slice(offs[i], offs[i + 1]) for i in range(L)]
    limit = torch.tensor([10 * n if maxiter is None else maxiter for n in sizes], device=device)
    Ms = list(M) if M is not None else [None] * L

    def segsum(v: Tensor) -> Tensor:
        """``[L]`` sums over the systems' segments (each the same reduction as :func:`cg`'s)."""
        return torch.stack([t.sum() for t in v.split(sizes)])

    def segnorm(v: Tensor) -> Tensor:
        return torch.stack(torch._foreach_norm(v.split(sizes)))

    def fail(msg: str, i: int):
        raise CGBlockError(f"cg_blocks: system {i}: {msg}", i)

    def first(mask: Tensor) -> int:
        return int(mask.nonzero()[0, 0])

    def finite_or_fail(v: Tensor, what: str, fix: str, mask: Optional[Tensor] = None) -> None:
        if all_finite(v):
            return
        bad = ~torch.isfinite(segsum(v.abs()))
        fail(f"{what} contains NaN or Inf entries; {fix}.", first(bad if mask is None else bad & mask))

    def apply(fns: List[Optional[Callable]], v: Tensor, run: List[bool], what: str) -> Tensor:
        """``fns[i](v_i)`` packed, for the systems with ``run[i]`` (``v_i`` elsewhere)."""
        parts = []
        for i in range(L):
            vi = v[sl[i]]
            if not run[i] or fns[i] is None:
                parts.append(vi)
                continue
            out = fns[i](vi.view(shapes[i]))
            if not isinstance(out, Tensor) or out.shape != shapes[i]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                fail(f"the output of {what} has shape {got}, expected {tuple(shapes[i])}.", i)
            parts.append(out.reshape(-1))
        return torch.cat(parts).to(dtype)

    def apply_a(v: Tensor, run: List[bool]) -> Tensor:
        Av = apply(A, v, run, "A")
        return Av + shift * v if shift else Av

    bv = torch.cat([t.reshape(-1) for t in b])
    finite_or_fail(bv, "the right-hand side b", "check the inputs for NaN/Inf")
    starts = [x0 is None or x0[i] is None for i in range(L)]
    x = torch.zeros_like(bv)
    r = bv.clone()
    if not all(starts):
        for i in range(L):
            if not starts[i]:
                if tuple(x0[i].shape) != tuple(shapes[i]):
                    fail(f"x0 has shape {tuple(x0[i].shape)}, expected {tuple(shapes[i])}.", i)
                x[sl[i]] = x0[i].reshape(-1).to(dtype)
        finite_or_fail(x, "the initial guess x0", "check the inputs for NaN/Inf")
        Ax = apply_a(x, [not s for s in starts])
        finite_or_fail(Ax, "A(x0)", "the operator A returned NaN/Inf")
        r = torch.where(torch.tensor(starts, device=device)[seg], bv, bv - Ax)
    start_zero = torch.tensor(starts, device=device)

    thresh = torch.clamp(tol * segnorm(bv), min=atol)
    rnorm = segnorm(r)
    active = rnorm > thresh
    iters = torch.zeros(L, dtype=torch.long, device=device)
    stopped = torch.zeros_like(active)
    converged = ~active

    def masked_ratio(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
        """``num / den`` on running systems, 0 elsewhere (inf / NaN of the others discarded)."""
        return torch.where(mask, num / den, 0.0)

    def precondition(r: Tensor, mask: Tensor, run: List[bool], it: int) -> Tuple[Tensor, Tensor]:
        if M is None:
            return r, segsum(r * r)
        z = apply(Ms, r, run, "M")
        finite_or_fail(z, "the preconditioner output M(r)", "the preconditioner returned NaN/Inf", mask)
        rz = segsum(r * z)
        bad = mask & ~(rz > 0)
        if bool(bad.any()):
            i = first(bad)
            fail(
                f"the preconditioner M is not positive definite (r^T M r = {float(rz[i]):.3g} at iteration "
                f"{it}); M must be SPD — check its damping.", i,
            )
        return z, rz

    run = active.tolist()
    if any(run):
        z, rz = precondition(r, active, run, 0)
        p = z.clone()
    it = 0
    while any(run):
        it += 1
        Ap = apply_a(p, run)
        finite_or_fail(Ap, "the operator output A(p)", "the operator A returned NaN/Inf", active)
        iters = torch.where(active, it, iters)
        pAp = segsum(p * Ap)
        bad = active & ~(pAp > 0)
        if bool(bad.any()):
            if negative_curvature == "raise":
                i = first(bad)
                fail(
                    f"non-SPD curvature, p^T A p = {float(pAp[i]):.3g} <= 0 at iteration {it}; A must be "
                    "symmetric positive definite — add damping (e.g. A + λI) or use a PSD curvature (GGN/Fisher).", i,
                )
            if it == 1:  # a stop at the first iteration from a zero start: the steepest-descent b
                x = torch.where((bad & start_zero)[seg], bv, x)
            stopped = stopped | bad
            active = active & ~bad
        alpha = masked_ratio(rz, pAp, active)[seg]
        x = x + alpha * p
        r = r - alpha * Ap
        rnorm = segnorm(r)
        converged = converged | (active & (rnorm <= thresh))
        active = active & (rnorm > thresh) & (iters < limit)
        run = active.tolist()
        if not any(run):
            break
        z, rz_new = precondition(r, active, run, it)
        p = z + masked_ratio(rz_new, rz, active)[seg] * p
        rz = rz_new

    xs = [x[sl[i]].view(shapes[i]) for i in range(L)]
    infos = []
    for i, (c, s, n, rn) in enumerate(zip(converged.tolist(), stopped.tolist(), iters.tolist(), rnorm.tolist())):
        if s:
            infos.append(CGInfo(0, False, n, rn, True))
        else:
            infos.append(CGInfo(n if c else 0, c, n, rn))
    return xs, infos
