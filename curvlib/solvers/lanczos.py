r"""Lanczos (symmetric) and Golub–Kahan–Lanczos (rectangular) with full reorthogonalization.

* :func:`lanczos`: ``A V = V T + β v e^T`` (Lanczos 1950) with full reorthogonalization and thick
  restarts (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric eigenvalue
  problems"); Ritz pairs of ``T`` approximate the extreme eigenpairs of ``A``.
* :func:`golub_kahan`: ``R V = U B``, ``R^T U = V B^T + β v e^T`` (Golub & Kahan 1965) with full
  reorthogonalization of both bases and thick restarts (Baglama & Reichel 2005, "Augmented
  implicitly restarted Lanczos bidiagonalization methods"); singular triplets of ``B``
  approximate the largest singular triplets of ``R``.

When the Krylov space reaches the full dimension the results are exact up to round-off.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._linalg import check_finite, default_tol, make_generator, orthogonalize, random_orthogonal_vector
from .structure import Structure, TensorOrList

__all__ = ["lanczos", "golub_kahan"]


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

    Returns:
        ``(evals [k], evecs [n, k])``: eigenvalues in ``which`` order (descending for ``"LA"``),
        orthonormal eigenvectors as columns (in the flatten order of ``v0``).
    """
    s = Structure.of(v0, "v0")
    v = s.flatten(v0, "v0")
    if not v.is_floating_point():
        v = v.to(torch.get_default_dtype())
    check_finite(v, "lanczos: starting vector v0")
    n = v.numel()
    if not 1 <= k <= n:
        raise ValueError(f"lanczos: k must satisfy 1 <= k <= n = {n}, got k={k}.")
    v_norm = float(torch.linalg.vector_norm(v))
    if v_norm == 0:
        raise ValueError("lanczos: the starting vector v0 is zero; pass a nonzero (e.g. random) v0.")
    ncv = min(n, max(2 * k + 1, 20)) if ncv is None else min(int(ncv), n)
    if ncv < min(n, k + 1):
        raise ValueError(f"lanczos: ncv={ncv} must be > k={k} (or equal n).")
    maxiter = max(10 * n, 100) if maxiter is None else int(maxiter)
    tol = default_tol(v.dtype, 1e-10, 1e-4) if tol is None else float(tol)
    eps = torch.finfo(v.dtype).eps
    op = s.wrap(A, "A")
    gen = make_generator(v, seed)

    V = torch.zeros(n, ncv + 1, dtype=v.dtype, device=v.device)
    T = torch.zeros(ncv + 1, ncv + 1, dtype=v.dtype, device=v.device)
    V[:, 0] = v / v_norm
    start, matvecs, anorm = 0, 0, 0.0
    while True:
        theta = S = sel = None
        for j in range(start, ncv):
            w = op(V[:, j])
            matvecs += 1
            check_finite(w, "lanczos: operator output A(v)", "the operator A returned NaN/Inf")
            anorm = max(anorm, float(torch.linalg.vector_norm(w)))
            w, h, beta = orthogonalize(w, V[:, : j + 1])
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            m = j + 1
            complete = m == n
            broke = beta <= 100 * eps * max(anorm, 1e-300)
            if complete or broke:
                beta = 0.0
                if not complete:  # invariant subspace: continue with a random orthogonal direction
                    V[:, m] = random_orthogonal_vector(V[:, :m], n, gen, v)
            else:
                V[:, m] = w / beta
            T[m, j] = T[j, m] = beta
            if m < k and not complete:
                continue
            theta, S = torch.linalg.eigh(T[:m, :m])
            sel = _order(theta, which)[:k]
            res = beta * S[m - 1, sel].abs()
            scale = max(float(theta.abs().max()), 1e-300)
            if complete or (not broke and bool((res <= tol * scale).all())):
                return theta[sel], V[:, :m] @ S[:, sel]
            if matvecs >= maxiter:
                break
        else:
            m = ncv
        if matvecs >= maxiter:
            warnings.warn(
                f"lanczos: {k} eigenpairs did not converge to tol={tol:g} within maxiter={maxiter} operator "
                "products; returning the current Ritz pairs (increase maxiter or ncv).",
                RuntimeWarning,
                stacklevel=2,
            )
            return theta[sel], V[:, :m] @ S[:, sel]
        # thick restart: keep the p best Ritz vectors and the residual vector
        p = min(max(k + (ncv - k) // 2, k), ncv - 1)
        keep = _order(theta, which)[:p]
        beta = float(T[m, m - 1])
        V[:, :p] = V[:, :m] @ S[:, keep]
        V[:, p] = V[:, m]
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
    sv = Structure.of(v0, "v0")
    v = sv.flatten(v0, "v0")
    if not v.is_floating_point():
        v = v.to(torch.get_default_dtype())
    check_finite(v, "golub_kahan: starting vector v0")
    n = v.numel()
    v_norm = float(torch.linalg.vector_norm(v))
    if v_norm == 0:
        raise ValueError("golub_kahan: the starting vector v0 is zero; pass a nonzero (e.g. random) v0.")
    v = v / v_norm
    out0 = matvec(sv.unflatten(v))
    su = Structure.of(out0, "matvec output")
    u_first = su.flatten(out0, "matvec output").to(v.dtype)
    mdim = su.numel
    rdim = min(mdim, n)
    if not 1 <= k <= rdim:
        raise ValueError(f"golub_kahan: k must satisfy 1 <= k <= min(m, n) = {rdim}, got k={k}.")
    ncv = min(rdim, max(2 * k + 1, 20)) if ncv is None else min(int(ncv), rdim)
    if ncv < min(rdim, k + 1):
        raise ValueError(f"golub_kahan: ncv={ncv} must be > k={k} (or equal min(m, n)).")
    maxiter = max(10 * rdim, 100) if maxiter is None else int(maxiter)
    tol = default_tol(v.dtype, 1e-10, 1e-4) if tol is None else float(tol)
    eps = torch.finfo(v.dtype).eps
    dev, dt = v.device, v.dtype

    def R(x: Tensor) -> Tensor:
        return su.flatten(matvec(sv.unflatten(x)), "output of matvec").to(dt)

    def Rt(u: Tensor) -> Tensor:
        return sv.flatten(rmatvec(su.unflatten(u)), "output of rmatvec").to(dt)

    gen = make_generator(v, seed)
    V = torch.zeros(n, ncv + 1, dtype=dt, device=dev)
    U = torch.zeros(mdim, ncv, dtype=dt, device=dev)
    B = torch.zeros(ncv, ncv, dtype=dt, device=dev)
    V[:, 0] = v
    start, matvecs, anorm, restarted = 0, 0, 0.0, False
    pending = u_first  # R v0 already computed
    while True:
        for j in range(start, ncv):
            if pending is not None:
                u, pending = pending, None
            else:
                u = R(V[:, j])
            matvecs += 1
            check_finite(u, "golub_kahan: matvec output R v", "matvec returned NaN/Inf")
            anorm = max(anorm, float(torch.linalg.vector_norm(u)))
            u, h, alpha = orthogonalize(u, U[:, :j])
            B[:j, j] = h
            if alpha <= 100 * eps * max(anorm, 1e-300):
                u = random_orthogonal_vector(U[:, :j], mdim, gen, v)
                alpha = 0.0
            else:
                u = u / alpha
            B[j, j] = alpha
            U[:, j] = u
            w = Rt(u)
            check_finite(w, "golub_kahan: rmatvec output R^T u", "rmatvec returned NaN/Inf")
            anorm = max(anorm, float(torch.linalg.vector_norm(w)))
            w, _, beta = orthogonalize(w, V[:, : j + 1])
            mc = j + 1
            right_complete = mc == n
            broke = beta <= 100 * eps * max(anorm, 1e-300)
            # a breakdown right after a random restart vector: R is numerically zero on the
            # rest of the space, so the current Ritz triplets are final (float32 operators of
            # low numerical rank would otherwise restart at every step until maxiter)
            exhausted = broke and restarted
            restarted = False
            if right_complete or broke:
                beta = 0.0
                if not right_complete:
                    V[:, mc] = random_orthogonal_vector(V[:, :mc], n, gen, v)
                    restarted = True
            else:
                V[:, mc] = w / beta
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
            if matvecs >= maxiter:
                warnings.warn(
                    f"golub_kahan: {k} singular triplets did not converge to tol={tol:g} within "
                    f"maxiter={maxiter} products; returning the current approximations (increase maxiter/ncv).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return U[:, :mc] @ P[:, :k], sig[:k], V[:, :mc] @ Qt[:k].T
        # thick restart (mc == ncv): keep p Ritz triplets and the residual vector
        p = min(max(k + (ncv - k) // 2, k), ncv - 1)
        V[:, :p] = V[:, :mc] @ Qt[:p].T
        V[:, p] = V[:, mc]
        U[:, :p] = U[:, :mc] @ P[:, :p]
        U[:, p:] = 0
        B.zero_()
        B[:p, :p] = torch.diag(sig[:p])
        start = p
