"""Shared numerical helpers: finiteness checks, robust ``eigh``, Gram–Schmidt, tolerances."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["all_finite", "check_finite", "safe_eigh", "default_tol", "orthogonalize", "random_orthogonal_vector"]


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, in one reduction: a tensor with a NaN or Inf
    entry has a non-finite sum, so a finite sum proves every entry finite (about 40x cheaper
    than ``isfinite(x).all()``, which writes a boolean tensor); only a non-finite sum (an
    overflow of finite entries is possible) is checked entry by entry."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: Tensor, name: str, fix: str = "check the inputs for NaN/Inf") -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` has a NaN or Inf entry."""
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf entries; {fix}.")


def check_damping(damping: float, name: str = "damping", positive: bool = False) -> float:
    d = float(damping)
    if not (d == d) or d in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {damping}.")
    if d < 0 or (positive and d == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {damping}.")
    return d


def default_tol(dtype: torch.dtype, tol64: float, tol32: float) -> float:
    """``tol64`` for float64 (and complex128), ``tol32`` for float32 and lower precisions."""
    return tol64 if dtype in (torch.float64, torch.complex128) else tol32


def safe_eigh(M: Tensor, name: str) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition ``M = Q diag(L) Q^T`` of the symmetric part of ``M`` [..., n, n].

    If ``torch.linalg.eigh`` fails or returns non-finite values in a precision lower than
    float64, retries in float64 (with a ``warnings.warn``) and casts back. Never returns NaN:
    raises ``ValueError`` / ``torch.linalg.LinAlgError`` naming ``name`` instead.
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"{name} must be a square matrix [..., n, n], got shape {tuple(M.shape)}.")
    check_finite(M, name, "the curvature factor must be finite (check the captured quantities / use float64)")
    S = 0.5 * (M + M.transpose(-1, -2))
    err: Optional[Exception] = None
    try:
        L, Q = torch.linalg.eigh(S)
        if all_finite(L) and all_finite(Q):
            return L, Q
    except (RuntimeError, torch.linalg.LinAlgError) as e:  # LinAlgError subclasses RuntimeError
        err = e
    if S.dtype != torch.float64:
        warnings.warn(
            f"torch.linalg.eigh of {name} failed or returned non-finite values in {S.dtype}"
            f"{f' ({err})' if err else ''}; retrying in float64.",
            RuntimeWarning,
            stacklevel=3,
        )
        L, Q = torch.linalg.eigh(S.to(torch.float64))
        if all_finite(L) and all_finite(Q):
            return L.to(S.dtype), Q.to(S.dtype)
    raise torch.linalg.LinAlgError(
        f"eigendecomposition of {name} failed even in float64{f' ({err})' if err else ''}; "
        "the matrix is probably badly scaled — add damping or rescale it."
    )


def orthogonalize(w: Tensor, Q: Tensor) -> Tuple[Tensor, Tensor, float]:
    """Classical Gram–Schmidt of ``w`` [n] against orthonormal columns ``Q`` [n, j], repeated
    (DGKS criterion, at most 3 passes). Returns ``(w_perp, coefficients [j], ||w_perp||)``."""
    h = torch.zeros(Q.shape[1], dtype=w.dtype, device=w.device)
    norm_prev = float(torch.linalg.vector_norm(w))
    if Q.shape[1] == 0:
        return w, h, norm_prev
    for _ in range(3):
        c = Q.T @ w
        w = w - Q @ c
        h = h + c
        norm = float(torch.linalg.vector_norm(w))
        if norm > 0.7071 * norm_prev:
            break
        norm_prev = norm
    return w, h, norm


def random_orthogonal_vector(Q: Tensor, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """A random unit vector [n] orthogonal to the orthonormal columns of ``Q`` [n, j] (j < n)."""
    for _ in range(5):
        w = torch.randn(n, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
        w, _, norm = orthogonalize(w, Q)
        if norm > 1e-8:
            return w / norm
    raise RuntimeError("could not draw a vector orthogonal to the current basis (basis is complete?).")


def make_generator(like: Tensor, seed: int) -> torch.Generator:
    dev = like.device if like.device.type in ("cpu", "cuda") else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(seed)
