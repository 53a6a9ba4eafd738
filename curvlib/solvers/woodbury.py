r"""Exact damped natural gradient from per-sample gradient factors (Woodbury identity).

With ``F = U^T U / m`` (``U`` [m, d], row ``i`` the ``i``-th per-sample gradient factor):

    (F + λ I)^-1 g = (g - U^T (λ m I_m + U U^T)^-1 U g) / λ,

one ``m x m`` Cholesky instead of a ``d x d`` solve: ``O(m^2 d + m^3)`` (Woodbury 1950; used for
exact natural gradient e.g. by Ren & Goldfarb 2019, "Efficient subsampled Gauss-Newton and
natural gradient methods for training neural networks"). When ``m > d`` the ``d x d`` system
itself is the smaller one and is solved instead. Both run in float64 internally (see
:func:`woodbury_solve`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._linalg import check_damping, check_finite

__all__ = ["woodbury_solve", "woodbury_solve_blocks", "heuristic_block_damping"]


def _as_factor(U: Tensor, name: str) -> Tensor:
    if not isinstance(U, Tensor) or U.dim() < 2:
        raise ValueError(f"{name} must be a tensor [m, d] (or [m, *param_shape]), got {getattr(U, 'shape', U)}.")
    U = U.reshape(U.shape[0], -1)
    check_finite(U, name, "the per-sample gradients must be finite")
    return U


def _as_rhs(g: Tensor, d: int, name: str):
    """Return ``(g2 [d] or [d, B], restore_shape)``; a parameter-shaped g with d entries is flattened."""
    if not isinstance(g, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(g).__name__}.")
    if g.dim() in (1, 2) and g.shape[0] == d:
        g2 = g
    elif g.numel() == d:
        g2 = g.reshape(d)
    else:
        raise ValueError(f"{name} has shape {tuple(g.shape)}; expected [d] or [d, B] with d={d}.")
    check_finite(g2, name)
    return g2, g.shape


# float64 entries of U converted at a time (32 MiB): the float64 accumulation never copies
# all of a large float32 U
_CHUNK = 1 << 22


def _chunks(n: int, other: int, dtype: torch.dtype) -> List[slice]:
    """Slices of ``range(n)`` whose ``[len, other]`` float64 blocks hold about ``_CHUNK`` entries."""
    step = n if dtype == torch.float64 else max(1, _CHUNK // max(other, 1))
    return [slice(i, i + step) for i in range(0, max(n, 1), step)]


def _dual_gram(U: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """``(U U^T [m, m], U g [m] or [m, B])`` accumulated in float64 over column chunks of ``U``."""
    m, d = U.shape
    K = torch.zeros(m, m, dtype=torch.float64, device=U.device)
    y = torch.zeros((m,) + tuple(g.shape[1:]), dtype=torch.float64, device=U.device)
    for c in _chunks(d, m, U.dtype):
        Uc = U[:, c].double()
        K += Uc @ Uc.T
        y += Uc @ g[c].double()
    return K, y


def _dual_back(U: Tensor, g: Tensor, z: Tensor, lam: float) -> Tensor:
    """``(g - U^T z) / λ`` in float64 (column chunks of ``U``), returned in ``U.dtype``."""
    m, d = U.shape
    x = torch.empty(g.shape, dtype=U.dtype, device=U.device)
    for c in _chunks(d, m, U.dtype):
        x[c] = ((g[c].double() - U[:, c].double().T @ z) / lam).to(U.dtype)
    return x


def _primal_gram(U: Tensor) -> Tensor:
    """``U^T U`` [d, d] accumulated in float64 over row chunks of ``U``."""
    m, d = U.shape
    K = torch.zeros(d, d, dtype=torch.float64, device=U.device)
    for r in _chunks(m, d, U.dtype):
        Ur = U[r].double()
        K += Ur.T @ Ur
    return K


def _cholesky_solve(L: Tensor, y: Tensor) -> Tensor:
    return torch.cholesky_solve(y if y.dim() == 2 else y[:, None], L).reshape(y.shape)


def _primal_solve(U: Tensor, g: Tensor, lam: float, what: str) -> Tensor:
    """``(U^T U / m + λ I)^-1 g`` through the ``d x d`` system (the side to use when m > d)."""
    m, d = U.shape
    K = _primal_gram(U) / m + lam * torch.eye(d, dtype=torch.float64, device=U.device)
    L = _chol(K, what)
    return _cholesky_solve(L, g.double()).to(U.dtype)


def _chol(K: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(K)
    if bool((info != 0).any()):
        raise ValueError(
            f"non-SPD curvature: the Woodbury Gram matrix {what} is not positive definite; "
            "check the per-sample gradients for NaN/Inf or increase damping."
        )
    return L


def woodbury_solve(U: Tensor, g: Tensor, damping: float) -> Tensor:
    r"""``(U^T U / m + λ I)^-1 g``.

    Args:
        U: per-sample gradient factors ``[m, d]`` (``[m, *param_shape]`` is flattened).
        g: ``[d]`` or ``[d, B]`` (a tensor with ``d`` entries of another shape is flattened and
            the result reshaped back).
        damping: ``λ > 0``.

    Returns: tensor shaped like ``g``, in ``U``'s dtype. Cost ``O(min(m, d)^2 max(m, d))``:
    the ``m x m`` Woodbury system when ``m <= d``, the ``d x d`` system itself when ``m > d``.
    Gram matrices, solves and the Woodbury subtraction ``g - U^T z`` (which cancels most of
    ``g`` when ``λ`` is small) run in float64, so a float32 ``U`` gives a float32 answer
    accurate to float32 round-off of the exact solution for the given ``U`` and ``g`` (in
    float32 arithmetic the error grows like ``eps cond``: up to 47% was seen). ``U`` is
    converted to float64 in chunks of ``2^22`` entries, never as a whole.
    """
    lam = check_damping(damping, "woodbury_solve: damping", positive=True)
    U = _as_factor(U, "woodbury_solve: U")
    m, d = U.shape
    g2, shape = _as_rhs(g, d, "woodbury_solve: g")
    if m > d:
        return _primal_solve(U, g2, lam, "(U^T U / m + λ I)").reshape(shape)
    K, y = _dual_gram(U, g2)
    K += (lam * m) * torch.eye(m, dtype=torch.float64, device=U.device)
    L = _chol(K, "(λ m I + U U^T)")
    return _dual_back(U, g2, _cholesky_solve(L, y), lam).reshape(shape)


def heuristic_block_damping(Us: Sequence[Tensor], damping: float) -> Tensor:
    r"""Per-block damping ``λ_l = λ · t_l / mean_j(t_j)`` with ``t_l = tr(F_l) / d_l`` (the mean
    eigenvalue of block ``l``; ``tr F_l = ||U_l||_F^2 / m``), floored at ``1e-8 λ``.

    Rationale: a uniform ``λ`` over-damps blocks with small curvature and under-damps blocks
    with large curvature; scaling by the mean eigenvalue keeps ``λ_l`` relative to each block's
    curvature scale while the average over blocks of ``λ_l`` stays ``λ`` (before the floor).
    Returns a tensor ``[L]``.
    """
    lam = check_damping(damping, "damping", positive=True)
    Us = [_as_factor(U, f"Us[{i}]") for i, U in enumerate(Us)]
    t = torch.stack([(U.double() ** 2).sum() / (U.shape[0] * U.shape[1]) for U in Us])
    if float(t.mean()) == 0.0:
        return torch.full((len(Us),), lam, dtype=torch.float64, device=t.device)
    return (lam * t / t.mean()).clamp_min(1e-8 * lam)


def woodbury_solve_blocks(
    Us: Sequence[Tensor], gs: Sequence[Tensor], damping: float, heuristic_damping: bool = False
) -> List[Tensor]:
    r"""Block-diagonal exact natural gradient: ``[(F_l + λ_l I)^-1 g_l for each block l]``.

    Args:
        Us: per-block factors ``U_l`` [m, d_l] (same ``m`` for all blocks; ``F_l = U_l^T U_l / m``).
        gs: per-block right-hand sides ``[d_l]`` / ``[d_l, B]`` (or parameter-shaped).
        damping: ``λ > 0``.
        heuristic_damping: use ``λ_l`` of :func:`heuristic_block_damping` instead of ``λ``.

    Each block is solved on its cheaper side as in :func:`woodbury_solve` (float64 inside): the
    ``m x m`` Gram matrices ``λ_l m I + U_l U_l^T`` of the blocks with ``d_l >= m`` are factorized
    in one batched Cholesky, blocks with ``d_l < m`` (biases, small layers) solve their own
    ``d_l x d_l`` system. Results in the dtype of ``Us[0]``.
    """
    lam = check_damping(damping, "woodbury_solve_blocks: damping", positive=True)
    Us = [_as_factor(U, f"woodbury_solve_blocks: Us[{i}]") for i, U in enumerate(Us)]
    if len(Us) != len(gs) or not Us:
        raise ValueError(f"woodbury_solve_blocks: got {len(Us)} factors and {len(gs)} gradients; pass one per block.")
    m = Us[0].shape[0]
    if any(U.shape[0] != m for U in Us):
        raise ValueError(f"woodbury_solve_blocks: all U_l need the same number of rows m, got {[U.shape[0] for U in Us]}.")
    lams = heuristic_block_damping(Us, lam) if heuristic_damping else torch.full(
        (len(Us),), lam, dtype=torch.float64, device=Us[0].device)
    dt, dev = Us[0].dtype, Us[0].device
    rhs = [_as_rhs(g, U.shape[1], f"woodbury_solve_blocks: gs[{i}]") for i, (U, g) in enumerate(zip(Us, gs))]
    out: List[Optional[Tensor]] = [None] * len(Us)
    dual = [i for i, U in enumerate(Us) if U.shape[1] >= m]
    for i, U in enumerate(Us):  # blocks with d_l < m: their own d_l x d_l system
        if U.shape[1] < m:
            out[i] = _primal_solve(U, rhs[i][0], float(lams[i]), f"(U_{i}^T U_{i} / m + λ_{i} I)")
    if dual:
        grams = [_dual_gram(Us[i], rhs[i][0]) for i in dual]
        K = torch.stack([k for k, _ in grams])
        K += (lams[dual].to(dev) * m)[:, None, None] * torch.eye(m, dtype=torch.float64, device=dev)
        L = _chol(K, "(λ_l m I + U_l U_l^T)")
        for j, i in enumerate(dual):
            z = _cholesky_solve(L[j], grams[j][1])
            out[i] = _dual_back(Us[i], rhs[i][0], z, float(lams[i]))
    return [x.to(dt).reshape(shape) for x, (_, shape) in zip(out, rhs)]
