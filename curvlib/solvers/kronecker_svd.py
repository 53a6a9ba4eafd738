r"""Top singular triplets of a Van Loan rearrangement, as matrices: the SVD driver of KPSVD.

For a symmetric block ``F`` (``d0 d1 x d0 d1``) its rearrangement
``R(F)[(i,k),(a,b)] = F[(i,a),(k,b)]`` (``d0^2 x d1^2``) has the top singular triplets
``(s_i, vec(U_i), vec(V_i))`` that give the best Frobenius approximation
``F ≈ sum_i s_i U_i ⊗ V_i`` (Van Loan & Pitsianis 1993, "Approximation with Kronecker
products"). :func:`kronecker_svd` finds them from the products ``R v`` / ``R^T u`` only (power
iteration with deflation or Golub–Kahan–Lanczos); building those products from per-sample
gradients is :class:`curvlib.extensions.rearranged.RearrangedBlock`'s job.

Sign convention: the joint sign of ``(U_i, V_i)`` makes the trace of the factor with the larger
``|trace| / ||.||_F`` positive -- for the leading term of a positive semi-definite block both
factors are then PSD.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

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
        zero = torch.linalg.vector_norm(start, dim=0) == 0
        if bool(zero.any()):
            # a start R^T vec(U) that vanished: R is zero (zero curvature: a loss times 0,
            # saturated logits; KFACCorrected's residual of a one-sample type-2 block), or U is
            # orthogonal to its range. Zero curvature is valid: zero triplets; else a random start.
            z = noise(start.shape[1])
            if bool(zero.all()) and float(torch.linalg.vector_norm(matvec(z[:, 0]))) == 0:
                return _zero_terms(r0, r1, k, rank, dt, dev)
            start = torch.where(zero[None, :], z, start)
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
    return signed_terms(U, S.to(dt), V, rank)


def _zero_terms(r0: int, r1: int, k: int, rank: int, dt: torch.dtype, dev: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """``k`` zero triplets of a zero operator (unit identity-shaped singular vectors, ``S = 0``)."""
    U = (torch.eye(r0, dtype=dt, device=dev) / math.sqrt(r0)).expand(k, r0, r0).clone()
    V = (torch.eye(r1, dtype=dt, device=dev) / math.sqrt(r1)).expand(k, r1, r1).clone()
    return signed_terms(U, torch.zeros(k, dtype=dt, device=dev), V, rank)


def signed_terms(U: Tensor, S: Tensor, V: Tensor, rank: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Joint signs (module docstring) and zero padding of ``k <= rank`` triplets
    ``(U [k, *, r0, r0], S [k, *], V [k, *, r1, r1])`` to ``rank`` (``*``: optional batch
    dimensions, e.g. the groups of a grouped layer, each signed on its own)."""
    k = U.shape[0]
    tu, tv = torch.diagonal(U, dim1=-2, dim2=-1).sum(-1), torch.diagonal(V, dim1=-2, dim2=-1).sum(-1)
    sign = torch.where(tu.abs() >= tv.abs(), tu, tv).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U, V = U * sign[..., None, None], V * sign[..., None, None]
    if k < rank:  # R has fewer than `rank` nonzero singular values
        pad = rank - k
        U = torch.cat([U, U.new_zeros(pad, *U.shape[1:])])
        V = torch.cat([V, V.new_zeros(pad, *V.shape[1:])])
        S = torch.cat([S, S.new_zeros(pad, *S.shape[1:])])
    return U, S, V


def kronecker_svd_gram(
    x0: Tensor,
    x1: Tensor,
    rank: int,
    correction: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Top-``rank`` singular triplets of ``R = sum_j X_j ⊗ X_j`` (rearranged) exactly, from Grams.

    ``X_j = sum_t x0_{jt} x1_{jt}^T`` (``r0 x r1``) for ``x0 [M, T, r0]``, ``x1 [M, T, r1]``
    (``[M, r]`` means ``T = 1``), so ``R(F)`` of ``F = sum_j vec(X_j) vec(X_j)^T`` is

        R = sum_{j,t,t'} vec(x0_{jt} x0_{jt'}^T) vec(x1_{jt} x1_{jt'}^T)^T = U W V^T,

    ``U [r0^2, P]``, ``V [r1^2, P]`` with ``P = M T^2`` columns (``W = I``; a ``correction``
    ``(C0, C1)`` subtracts ``vec(C0) vec(C1)^T``: one more column each, ``W = diag(1, .., 1, -1)``).
    Nothing of size ``r0^2`` or ``r1^2`` is formed: with the ``P x P`` Grams
    ``K0 = U^T U``, ``K0[(j,t,t'),(l,u,u')] = (x0_jt . x0_lu)(x0_jt' . x0_lu')`` (for ``T = 1``
    the elementwise square ``(x0 x0^T)^2``), ``K1 = V^T V``, and ``U = Q0 K0^{1/2}``,
    ``V = Q1 K1^{1/2}`` (``Q`` orthonormal on the ranges), ``R = Q0 (K0^{1/2} W K1^{1/2}) Q1^T``:
    the singular values of ``R`` are those of ``B = K0^{1/2} W K1^{1/2}``. With ``l_i`` the top
    eigenvectors of ``B B^T = K0^{1/2} W K1 W K0^{1/2}`` (eigenvalues ``s_i^2``),

        v_i = R^T u_i / s_i = V c1_i,  c1_i = W K0^{1/2} l_i / s_i,
        u_i = R v_i / s_i = U c0_i,    c0_i = W K1 c1_i / s_i

    (no inverse square roots: a rank-deficient Gram is harmless). The matrices are then
    ``U_i = sum_j x0_j^T C0_{ij} x0_j`` (``C0_{ij} [T, T]`` from ``c0_i``; plus the coefficient of
    ``C0``), the cost of ``rank`` weighted Grams. In float64: ``K0 = E0 diag(l0) E0^T`` by
    ``eigh`` (eigenvalues below ``P eps max(l0)`` dropped), ``F0 = E0 diag(sqrt(l0))``, and
    ``B B^T = E0 H E0^T`` with the small ``H = F0^T W K1 W F0``, whose ``eigh`` gives
    ``l_i = E0 h_i`` and ``K0^{1/2} l_i = F0 h_i``. (Squaring costs the small singular values
    relative accuracy ``eps s_1^2 / s_i^2``: irrelevant for the leading terms.)

    Cost: two ``(M T)^2``-sized Gram products, two ``P x P`` eigendecompositions and ``rank``
    weighted Grams on each side -- independent of how well the singular values are separated
    (power iteration needs many products for close ones). :func:`gram_svd_flops` estimates it.

    Returns:
        as :func:`kronecker_svd`: ``(U [rank, r0, r0], S [rank], V [rank, r1, r1])`` in the dtype
        of ``x0``, unit Frobenius norms, the same sign convention, zero-padded beyond the number
        of nonzero singular values (e.g. ``P < rank``).
    """
    if x0.dim() == 2:
        x0, x1 = x0[:, None], x1[:, None]
    if x0.dim() != 3 or x1.dim() != 3 or x0.shape[:2] != x1.shape[:2]:
        raise ValueError(
            f"curvlib: kronecker_svd_gram needs x0 [M, T, r0] and x1 [M, T, r1] with the same M, T; "
            f"got {tuple(x0.shape)} and {tuple(x1.shape)}."
        )
    M, T, r0 = x0.shape
    r1 = x1.shape[-1]
    dt, dev = x0.dtype, x0.device
    X0, X1 = x0.to(torch.float64), x1.to(torch.float64)
    K0, K1 = _column_gram(X0), _column_gram(X1)
    w = torch.ones(K0.shape[0], dtype=torch.float64, device=dev)
    C0 = C1 = None
    if correction is not None:
        C0, C1 = (c.to(torch.float64) for c in correction)
        K0, K1 = _augment(K0, X0, C0), _augment(K1, X1, C1)
        w = torch.cat([w, -w.new_ones(1)])
    F0 = _root(K0)  # K0 = F0 F0^T, F0 = E0 diag(sqrt(l0)) [P, rank(K0)]
    k = min(rank, r0 * r0, r1 * r1, F0.shape[1])
    if k > 0:
        # B B^T = K0^{1/2} W K1 W K0^{1/2} = E0 H E0^T with the small H = F0^T W K1 W F0
        wK1w = w[:, None] * K1 * w[None, :]
        mu, Lh = torch.linalg.eigh(F0.T @ wK1w @ F0)
        mu, Lh = mu.flip(0)[:k], Lh.flip(1)[:, :k]
        k = int((mu > mu[0] * torch.finfo(torch.float64).eps * mu.shape[0]).sum()) if mu[0] > 0 else 0
    if k == 0:
        U = torch.zeros(0, r0, r0, dtype=dt, device=dev)
        V = torch.zeros(0, r1, r1, dtype=dt, device=dev)
        return signed_terms(U, torch.zeros(0, dtype=dt, device=dev), V, rank)
    S = mu[:k].sqrt()
    c1 = w[:, None] * (F0 @ Lh[:, :k]) / S  # right: K0^{1/2} l_i = F0 Lh_i
    c0 = w[:, None] * (K1 @ c1) / S  # left: u_i = R v_i / s_i = U W K1 c1_i / s_i
    U, V = _assemble(x0, X0, c0, C0), _assemble(x1, X1, c1, C1)
    # unit norms to round-off already; renormalize so that sum_i S_i U_i ⊗ V_i is unchanged
    # (norms accumulated in float64: a float32 sum over 10^6 entries is off by ~1e-5)
    nu = torch.linalg.vector_norm(U, dim=(1, 2), dtype=torch.float64)
    nv = torch.linalg.vector_norm(V, dim=(1, 2), dtype=torch.float64)
    U, V, S = U / nu.to(U.dtype)[:, None, None], V / nv.to(V.dtype)[:, None, None], S * nu * nv
    return signed_terms(U.to(dt), S.to(dt), V.to(dt), rank)


def gram_svd_flops(M: int, T: int, r0: int, r1: int, rank: int) -> float:
    """Estimated cost of :func:`kronecker_svd_gram` in float32 multiply-adds, ``P = M T^2``:
    float64 Grams counted twice, the two float64 ``P x P`` ``eigh`` and two ``P x P`` float64
    matmuls as ``28 P^3`` (measured on CPU, one thread, against float32 matmuls; P = 512:
    0.2 s), the weighted Grams as in float32."""
    P = M * T * T
    grams = (M * T) ** 2 * (r0 + r1) + (P * P if T > 1 else 0)
    assemble = rank * M * T * (r0 * (r0 + T) + r1 * (r1 + T))
    return float(2 * grams + 28 * P**3 + assemble)


def _column_gram(X: Tensor) -> Tensor:
    """``K[(j,t,t'),(l,u,u')] = (x_jt . x_lu)(x_jt' . x_lu')`` for ``X [M, T, r]`` -> ``[M T^2, M T^2]``."""
    M, T, r = X.shape
    g = X.reshape(M * T, r) @ X.reshape(M * T, r).T
    if T == 1:
        return g.square()
    g = g.reshape(M, T, M, T)
    return torch.einsum("jtlu,jvlw->jtvluw", g, g).reshape(M * T * T, M * T * T)


def _augment(K: Tensor, X: Tensor, C: Tensor) -> Tensor:
    """``K`` bordered by the column ``vec(C)``: ``<vec(x_t x_t'^T), vec(C)> = x_t^T C x_t'``."""
    b = torch.einsum("jtd,de,jue->jtu", X, C, X).reshape(-1)
    top = torch.cat([K, b[:, None]], 1)
    bottom = torch.cat([b, (C * C).sum().reshape(1)])[None]
    return torch.cat([top, bottom], 0)


def _root(K: Tensor) -> Tensor:
    """``F [P, r]`` with ``F F^T = K`` (PSD, ``F = E diag(sqrt(l))`` over the numerically nonzero
    eigenvalues ``l > P eps max(l)``)."""
    lam, E = torch.linalg.eigh(K)
    keep = lam > lam[-1].clamp_min(0) * K.shape[0] * torch.finfo(K.dtype).eps
    if lam[-1] <= 0:
        keep = torch.zeros_like(keep)
    return E[:, keep] * lam[keep].sqrt()


#: the weighted Grams are summed in the inputs' precision (float32: half the cost) unless
#: cancellation would amplify its round-off by more than this (then in float64)
_AMPLIFICATION = 1e3


def _assemble(x: Tensor, X: Tensor, c: Tensor, C: Optional[Tensor]) -> Tensor:
    """:func:`_weighted_grams` in ``x``'s dtype when ``sum_j |c_j| ||x_j||^2`` (the size of the
    terms that cancel to the unit-norm result) is at most :data:`_AMPLIFICATION`, else in float64
    (``X``: ``x`` in float64)."""
    if x.dtype == torch.float64:
        return _weighted_grams(X, c, C)
    M, T, _ = X.shape
    sq = X.reshape(M * T, -1).square().sum(1).reshape(M, T)
    sizes = (c[: M * T * T].abs().reshape(M, T, T, -1) * (sq[:, :, None] * sq[:, None, :]).sqrt()[..., None]).sum((0, 1, 2))
    if C is not None:
        sizes = sizes + c[-1].abs() * torch.linalg.matrix_norm(C)
    if bool((sizes > _AMPLIFICATION).any()):
        return _weighted_grams(X, c, C)
    return _weighted_grams(x, c.to(x.dtype), None if C is None else C.to(x.dtype))


def _weighted_grams(X: Tensor, c: Tensor, C: Optional[Tensor]) -> Tensor:
    """``[k, r, r]``: ``sum_j X_j^T C_j X_j`` (``C_j [T, T]`` from column ``i`` of ``c``), plus
    ``c[-1] C`` when ``C`` (the correction column) is given."""
    M, T, r = X.shape
    k = c.shape[1]
    cm = c[: M * T * T].reshape(M, T, T, k)
    Y = torch.einsum("jtuk,jud->kjtd", cm, X).reshape(k, M * T, r)
    out = X.reshape(M * T, r).T @ Y
    if C is not None:
        out = out + c[-1][:, None, None] * C
    return out


def _cast(fn: Callable[[Tensor], Tensor], dt: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``fn`` evaluated in ``dt``, input and output in the caller's dtype."""
    return lambda x: fn(x.to(dt)).to(x.dtype)


__all__ = ["kronecker_svd", "kronecker_svd_gram", "gram_svd_flops", "signed_terms", "METHODS"]
