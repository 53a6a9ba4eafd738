r"""Exact damped natural gradient from per-sample gradient factors (Woodbury identity).

With ``F = U^T U / m`` (``U`` [m, d], row ``i`` the ``i``-th per-sample gradient factor):

    (F + λ I)^-1 g = (g - U^T (λ m I_m + U U^T)^-1 U g) / λ,

one ``m x m`` Cholesky instead of a ``d x d`` solve: ``O(m^2 d + m^3)`` (Woodbury 1950; used for
exact natural gradient e.g. by Ren & Goldfarb 2019, "Efficient subsampled Gauss-Newton and
natural gradient methods for training neural networks").
"""
from __future__ import annotations

from typing import List, Sequence

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


def _solve_with_chol(U: Tensor, L: Tensor, g: Tensor, lam: float) -> Tensor:
    y = U @ g
    z = torch.cholesky_solve(y if y.dim() == 2 else y[:, None], L)
    z = z if y.dim() == 2 else z[:, 0]
    return (g - U.T @ z) / lam


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

    Returns: tensor shaped like ``g``. Cost ``O(m^2 d)``.
    """
    lam = check_damping(damping, "woodbury_solve: damping", positive=True)
    U = _as_factor(U, "woodbury_solve: U")
    m, d = U.shape
    g2, shape = _as_rhs(g, d, "woodbury_solve: g")
    K = U @ U.T + (lam * m) * torch.eye(m, dtype=U.dtype, device=U.device)
    L = _chol(K, "(λ m I + U U^T)")
    return _solve_with_chol(U, L, g2.to(U.dtype), lam).reshape(shape)


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
        return torch.full((len(Us),), lam, dtype=torch.float64)
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

    The ``L`` Gram matrices ``λ_l m I + U_l U_l^T`` are factorized in one batched Cholesky.
    """
    lam = check_damping(damping, "woodbury_solve_blocks: damping", positive=True)
    Us = [_as_factor(U, f"woodbury_solve_blocks: Us[{i}]") for i, U in enumerate(Us)]
    if len(Us) != len(gs) or not Us:
        raise ValueError(f"woodbury_solve_blocks: got {len(Us)} factors and {len(gs)} gradients; pass one per block.")
    m = Us[0].shape[0]
    if any(U.shape[0] != m for U in Us):
        raise ValueError(f"woodbury_solve_blocks: all U_l need the same number of rows m, got {[U.shape[0] for U in Us]}.")
    lams = heuristic_block_damping(Us, lam) if heuristic_damping else torch.full((len(Us),), lam, dtype=torch.float64)
    dt, dev = Us[0].dtype, Us[0].device
    K = torch.stack([U @ U.T for U in Us])
    K = K + (lams.to(device=dev, dtype=dt) * m)[:, None, None] * torch.eye(m, dtype=dt, device=dev)
    L = _chol(K, "(λ_l m I + U_l U_l^T)")
    out = []
    for i, (U, g) in enumerate(zip(Us, gs)):
        g2, shape = _as_rhs(g, U.shape[1], f"woodbury_solve_blocks: gs[{i}]")
        out.append(_solve_with_chol(U, L[i], g2.to(dt), float(lams[i])).reshape(shape))
    return out
