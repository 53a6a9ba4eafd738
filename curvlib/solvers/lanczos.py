r"""Lanczos (symmetric) and Golub–Kahan–Lanczos (rectangular) with full reorthogonalization.

* :func:`lanczos`: ``A V = V T + β v e^T`` (Lanczos 1950) with full reorthogonalization and thick
  restarts (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric eigenvalue
  problems"); Ritz pairs of ``T`` approximate the extreme eigenpairs of ``A``.
* :func:`golub_kahan`: ``R V = U B``, ``R^T U = V B^T + β v e^T`` (Golub & Kahan 1965) with full
  reorthogonalization of both bases and thick restarts (Baglama & Reichel 2005, "Augmented
  implicitly restarted Lanczos bidiagonalization methods"); singular triplets of ``B``
  approximate the largest singular triplets of ``R``.

When the Krylov space reaches the full dimension the results are exact up to round-off. Set-up,
breakdown handling (an invariant subspace ends the iteration once a random continuation vector
breaks down at once) and thick restarts are shared (:mod:`curvlib.solvers._krylov`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._krylov import KrylovProcess
from ._linalg import orthogonalize
from .structure import Structure, TensorOrList

__all__ = ["lanczos", "golub_kahan"]


_WHICH = ("LA", "SA", "LM")


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}.")


def lanczos(
    A: Callable[[TensorOrList], TensorOrList],
    v0: TensorOrList,
    k: int,
    maxiter: Optional[int] = None,
    tol: Optional[float] = None,
    ncv: Optional[int] = None,
    which: str = "LA",
    seed: int = 0,
) -> Tuple[Tensor, Tensor]:
    r"""The ``k`` largest (algebraic) eigenpairs of a symmetric operator.

    Args:
        A: symmetric operator, callable on tensors (or lists of tensors) shaped like ``v0``.
        v0: nonzero starting vector, any shape (flattened internally; ``n = v0.numel()``).
        k: number of eigenpairs, ``1 <= k <= n``.
        maxiter: maximum number of products with ``A`` (default ``max(10 n, 100)``).
        tol: a Ritz pair ``(θ, y)`` is accepted when ``||A y - θ y|| <= tol * max|θ|``
            (default 1e-10 in float64, 1e-4 in float32).
        ncv: Krylov basis size before a thick restart (default ``min(n, max(2k + 1, 20))``);
            for ``n <= ncv`` the full space is built and the result is exact to round-off.
        which: ``"LA"`` (largest algebraic, default), ``"SA"`` (smallest) or ``"LM"`` (magnitude).
        seed: seed for the random vectors that continue after an invariant subspace is found.

    An invariant subspace (breakdown: the new Lanczos vector vanishes at the operator's scale,
    ``100 eps max_j ||A v_j||``) makes its Ritz pairs exact; the iteration continues with one
    random vector orthogonal to the basis, and stops as converged when that vector breaks down
    at once (``A`` is then a multiple of the identity on the rest of the space). So
    ``c I + rank r`` operators (e.g. a damped GGN of a small batch) cost about ``r + 2``
    products instead of ``maxiter``.

    Returns:
        ``(evals [k], evecs [n, k])``: eigenvalues in ``which`` order (descending for ``"LA"``),
        orthonormal eigenvectors as columns (in the flatten order of ``v0``).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}.")
    kp = KrylovProcess("lanczos", v0, seed)
    n = kp.n
    kp.sizes(k, n, "n", ncv, maxiter, tol)
    ncv, tol = kp.ncv, kp.tol
    op = kp.structure.wrap(A, "A")

    V = torch.zeros(n, ncv + 1, dtype=kp.dtype, device=kp.device)
    T = torch.zeros(ncv + 1, ncv + 1, dtype=kp.dtype, device=kp.device)
    V[:, 0] = kp.v
    start = 0
    while True:
        theta = S = sel = None
        for j in range(start, ncv):
            w = op(V[:, j])
            kp.record(w, "operator output A(v)", "the operator A returned NaN/Inf")
            m = j + 1
            complete = m == n
            h, beta, q, broke, exhausted = kp.extend(w, V[:, :m])
            T[:m, j] = h
            T[j, :m] = h
            if complete:
                beta = 0.0
            elif q is not None:
                V[:, m] = q
            T[m, j] = T[j, m] = beta
            if m < k and not complete:
                continue
            theta, S = torch.linalg.eigh(T[:m, :m])
            sel = _order(theta, which)[:k]
            res = beta * S[m - 1, sel].abs()
            scale = max(float(theta.abs().max()), 1e-300)
            if complete or exhausted or (not broke and bool((res <= tol * scale).all())):
                return theta[sel], V[:, :m] @ S[:, sel]
            if kp.out_of_budget():
                break
        else:
            m = ncv
        if kp.out_of_budget():
            kp.warn_budget("eigenpairs")
            return theta[sel], V[:, :m] @ S[:, sel]
        # thick restart: keep the p best Ritz vectors and the residual vector
        keep = _order(theta, which)[: kp.restart_size()]
        beta = float(T[m, m - 1])
        p = kp.restart_basis(V, m, S[:, keep])
        T.zero_()
        T[:p, :p] = torch.diag(theta[keep])
        coupling = beta * S[m - 1, keep]
        T[p, :p] = coupling
        T[:p, p] = coupling
        start = p


def golub_kahan(
    matvec: Callable[[TensorOrList], TensorOrList],
    rmatvec: Callable[[TensorOrList], TensorOrList],
    v0: TensorOrList,
    k: int,
    maxiter: Optional[int] = None,
    tol: Optional[float] = None,
    ncv: Optional[int] = None,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The ``k`` largest singular triplets of ``R`` [m, n] given ``R v`` and ``R^T u``.

    Args:
        matvec: ``v -> R v`` on tensors shaped like ``v0`` (the output may have any shape; it
            defines the shape ``rmatvec`` receives).
        rmatvec: ``u -> R^T u`` (returns a tensor shaped like ``v0``).
        v0: nonzero starting right vector, any shape (``n = v0.numel()``).
        k: number of triplets, ``1 <= k <= min(m, n)``.
        maxiter: maximum number of products with ``R`` (default ``max(10 min(m, n), 100)``).
        tol: a triplet is accepted when ``||R^T u - σ v|| <= tol * σ_1`` (``R v = σ u`` holds exactly);
            default 1e-10 in float64, 1e-4 in float32.
        ncv: bidiagonalization size before a thick restart (default ``min(m, n, max(2k + 1, 20))``).

    Returns:
        ``(U [m, k], S [k] descending, V [n, k])`` with orthonormal columns, ``R V ≈ U diag(S)``
        (flatten orders of ``matvec``'s output and of ``v0``; singular vectors up to sign).
    """
    kp = KrylovProcess("golub_kahan", v0, seed)
    sv, v, n = kp.structure, kp.v, kp.n
    out0 = matvec(sv.unflatten(v))
    su = Structure.of(out0, "matvec output")
    u_first = su.flatten(out0, "matvec output").to(v.dtype)
    mdim = su.numel
    rdim = min(mdim, n)
    kp.sizes(k, rdim, "min(m, n)", ncv, maxiter, tol)
    ncv, tol = kp.ncv, kp.tol
    dev, dt = kp.device, kp.dtype

    def R(x: Tensor) -> Tensor:
        return su.flatten(matvec(sv.unflatten(x)), "output of matvec").to(dt)

    def Rt(u: Tensor) -> Tensor:
        return sv.flatten(rmatvec(su.unflatten(u)), "output of rmatvec").to(dt)

    V = torch.zeros(n, ncv + 1, dtype=dt, device=dev)
    U = torch.zeros(mdim, ncv, dtype=dt, device=dev)
    B = torch.zeros(ncv, ncv, dtype=dt, device=dev)
    V[:, 0] = v
    start = 0
    pending = u_first  # R v0 already computed
    while True:
        for j in range(start, ncv):
            if pending is not None:
                u, pending = pending, None
            else:
                u = R(V[:, j])
            kp.record(u, "matvec output R v", "matvec returned NaN/Inf")
            # left vector: a breakdown continues with a random vector (no exhaustion test)
            h, alpha, U[:, j], _, _ = kp.extend(u, U[:, :j], track=False)
            B[:j, j] = h
            B[j, j] = alpha
            w = Rt(U[:, j])
            kp.record(w, "rmatvec output R^T u", "rmatvec returned NaN/Inf", count=False)
            mc = j + 1
            right_complete = mc == n
            _, beta, q, broke, exhausted = kp.extend(w, V[:, :mc])
            # exhausted: a breakdown right after a random continuation vector; R is then
            # numerically zero on the rest of the space, so the current triplets are final
            # (float32 operators of low numerical rank would otherwise restart until maxiter)
            if right_complete:
                beta = 0.0
            elif q is not None:
                V[:, mc] = q
            if mc < k:
                continue
            if mc == mdim and not right_complete:
                # U spans R^m: U^T R = [B, β e] [V, v]^T exactly, so its SVD is exact
                Bx = torch.cat([B[:mc, :mc], torch.zeros(mc, 1, dtype=dt, device=dev)], dim=1)
                Bx[mc - 1, mc] = beta
                P, sig, Qt = torch.linalg.svd(Bx, full_matrices=False)
                return U[:, :mc] @ P[:, :k], sig[:k], V[:, : mc + 1] @ Qt[:k].T
            P, sig, Qt = torch.linalg.svd(B[:mc, :mc])
            res = beta * P[mc - 1, :k].abs()
            scale = max(float(sig[0]), 1e-300)
            if right_complete or exhausted or (not broke and bool((res <= tol * scale).all())):
                return U[:, :mc] @ P[:, :k], sig[:k], V[:, :mc] @ Qt[:k].T
            if kp.out_of_budget():
                kp.warn_budget("singular triplets")
                return U[:, :mc] @ P[:, :k], sig[:k], V[:, :mc] @ Qt[:k].T
        # thick restart (mc == ncv): keep p Ritz triplets and the residual vector
        p = kp.restart_basis(V, mc, Qt[: kp.restart_size()].T)
        U[:, :p] = U[:, :mc] @ P[:, :p]
        U[:, p:] = 0
        B.zero_()
        B[:p, :p] = torch.diag(sig[:p])
        start = p
