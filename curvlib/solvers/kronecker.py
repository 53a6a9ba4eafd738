r"""Kronecker-factored curvature: the factor forms, products with sums of Kronecker products, and
the small decompositions that :class:`~curvlib.solvers.kronecker_inverse.KroneckerInverse` builds on.

Orientation (curvlib's ``p.kfac`` convention): a weight ``W`` [out, in] is flattened row-major,
``G`` is [out, out], ``A`` is [in, in] and ``kron(G, A) vec(V) = vec(G V A)`` (factors symmetric).

Factor forms: a dense ``[m, m]`` matrix; a **1-D** factor ``[m]``, the diagonal
matrix ``diag(F)`` (e.g. an Embedding's token frequencies: no ``m x m`` matrix is formed); and
the **block form** ``[B, m, m]``, ``blockdiag_b(F[b])`` over ``B`` consecutive slices (grouped
convolutions: ``V [B m, n]`` viewed ``[B, m, n]``).

Terms: ``[[G, A]]`` (a weight), ``[[G]]`` (a bias; several one-factor terms are summed) or
``[[G1, A1], [G2, A2]]``; a single term may be passed unnested (``p.kfac``): :func:`normalize_terms`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._linalg import all_finite, check_finite, safe_eigh

__all__ = [
    "normalize_terms", "kron_matvec", "factor_eig", "damped_factor_inverse", "factor_diagonal", "dense_factor",
    "inverse_from_eig", "left_mul", "right_mul", "pi_damping", "check_spd", "generalized_eigh", "transpose_mul",
]


def normalize_terms(terms) -> List[List[Tensor]]:
    """Accept ``[G, A]`` / ``[G]`` (one term, e.g. ``p.kfac``) or ``[[G1, A1], [G2, A2]]``; check
    each factor's form and finiteness."""
    if isinstance(terms, Tensor):
        return [[terms]]
    terms = list(terms)
    if not terms:
        raise ValueError("KroneckerInverse: terms is empty; pass [[G, A]], [[G]] or [[G1, A1], [G2, A2]].")
    if isinstance(terms[0], Tensor):
        terms = [terms]
    out = []
    for i, t in enumerate(terms):
        t = list(t)
        if not 1 <= len(t) <= 2 or not all(isinstance(f, Tensor) for f in t):
            raise ValueError(f"KroneckerInverse: term {i} must be [G, A] or [G] (tensors), got {len(t)} entries.")
        for name, f in zip("GA", t):
            if not (f.dim() == 1 or (f.dim() in (2, 3) and f.shape[-1] == f.shape[-2])):
                raise ValueError(
                    f"KroneckerInverse: factor {name}{i + 1} must be a square matrix [m, m], a diagonal "
                    f"[m] or a block form [B, m, m], got shape {tuple(f.shape)}."
                )
            check_finite(f, f"Kronecker factor {name}{i + 1}", "the curvature factors must be finite")
        out.append(t)
    return out


def kron_matvec(terms, V: Tensor) -> Tensor:
    """``sum_i kron(G_i, A_i) vec(V)`` as ``sum_i G_i V A_i`` (bias terms ``[G]``: ``sum_i G_i v``)
    for every factor form of :class:`KroneckerInverse`: dense ``[m, m]``, diagonal ``[m]`` and block
    ``[B, m, m]`` (``V [*, B m, n]`` viewed ``[*, B, m, n]``, ``v [*, B m]`` viewed ``[*, B, m]``).

    ``terms``: as :class:`KroneckerInverse` (one term may be passed unnested, e.g. ``p.kfac``);
    ``V``: ``[*, out, in]`` (bias: ``[*, out]``). Returns the undamped product, shaped like ``V``.
    """
    terms = normalize_terms(terms)
    out = torch.zeros_like(V)
    for t in terms:
        G = t[0]
        if len(t) == 1:
            if G.dim() == 3:
                u = V.reshape(*V.shape[:-1], G.shape[0], G.shape[1]).unsqueeze(-1)
                out = out + (G @ u).reshape(V.shape)
            else:
                out = out + (V * G if G.dim() == 1 else V @ G.mT)
            continue
        A = t[1]
        if G.dim() == 3:
            Vb = V.reshape(*V.shape[:-2], G.shape[0], G.shape[1], V.shape[-1])
            out = out + (G @ Vb @ A).reshape(V.shape)
        else:
            out = out + right_mul(left_mul(G, V), A)
    return out


# ---------------------------------------------------------------------- factor forms
def factor_eig(F: Tensor, name: str) -> Tuple[Tensor, Optional[Tensor]]:
    """``(eigenvalues, eigenvectors)`` of a factor: ``(F, None)`` for a 1-D (diagonal) one
    (no matrix formed), batched ``safe_eigh`` for ``[B, m, m]``."""
    if F.dim() == 1:
        return F, None
    return safe_eigh(F, name)


def damped_factor_inverse(F: Tensor, c) -> Optional[Tensor]:
    """``(F + c I)^-1`` by Cholesky (``1 / (F + c)`` for a 1-D diagonal factor; ``c`` a number
    or ``[B, 1, 1]`` for block factors ``[B, m, m]``); ``None`` when ``F + c I`` is not
    numerically positive definite."""
    if F.dim() == 1:
        d = F + c
        return 1.0 / d if bool((d > 0).all()) else None
    M = F.clone()
    M.diagonal(dim1=-2, dim2=-1).add_(c if isinstance(c, (int, float)) else c.squeeze(-1))
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        return None
    inv = torch.cholesky_inverse(L)
    return inv if all_finite(inv) else None


def factor_diagonal(F: Tensor) -> Tensor:
    """The diagonal of a factor (a 1-D factor is its own)."""
    return F if F.dim() == 1 else torch.diagonal(F, dim1=-2, dim2=-1)


def dense_factor(F: Tensor) -> Tensor:
    """The dense matrix of a factor (tests / :meth:`KroneckerInverse.damped_matrix`)."""
    if F.dim() == 3:
        return torch.block_diag(*F)
    return torch.diag(F) if F.dim() == 1 else F


def inverse_from_eig(lam: Tensor, Q: Optional[Tensor]) -> Tensor:
    """``Q diag(1/lam) Q^T`` (``[..., m, m]``), or the 1-D ``1/lam`` for a diagonal factor."""
    if Q is None:
        return 1.0 / lam
    return (Q / lam[..., None, :]) @ Q.mT


def left_mul(M: Tensor, V: Tensor) -> Tensor:
    """``M V`` for a matrix or diagonal (1-D) ``M``."""
    return M[:, None] * V if M.dim() == 1 else M @ V


def right_mul(V: Tensor, M: Tensor) -> Tensor:
    """``V M`` for a matrix or diagonal (1-D) ``M``."""
    return V * M if M.dim() == 1 else V @ M


# ---------------------------------------------------------------------- damping and decompositions
def pi_damping(G: Tensor, A: Tensor, which: str) -> Tuple[Union[float, Tensor], Tensor, Tensor]:
    """``(π, G, A)``: ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, §6.3; a
    tensor ``[B]`` for block factors) and the factors to damp. A PSD factor with zero trace is zero,
    and so is its Kronecker product (a dead ReLU channel ahead of a depthwise convolution zeroes its
    group's ``A``): there ``π = 1`` and both factors are returned zeroed, so that the π-damped term
    is ``(√λ I) ⊗ (√λ I) = λ I``, the damped zero curvature (the limit of the π rule). A negative
    trace (a non-PSD factor) raises, naming ``which`` factors."""
    if G.dim() == 3:
        trG = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
        trA = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
        if not (bool((trG >= 0).all()) and bool((trA >= 0).all())):
            raise ValueError(
                f"damping_mode='pi' needs non-negative mean traces of every block of {which} (got "
                f"min tr G/dim={float(trG.min()):.3g}, min tr A/dim={float(trA.min()):.3g}); the "
                "factors must be PSD — use damping_mode='exact'."
            )
        zero = (trG == 0) | (trA == 0)
        if not bool(zero.any()):
            return (trA / trG).sqrt(), G, A
        pi = torch.where(zero, torch.ones_like(trG), trA / torch.where(zero, torch.ones_like(trG), trG)).sqrt()
        return pi, G.masked_fill(zero[:, None, None], 0.0), A.masked_fill(zero[:, None, None], 0.0)
    trG = float(factor_diagonal(G).sum()) / G.shape[0]
    trA = float(factor_diagonal(A).sum()) / A.shape[0]
    if not (trG >= 0 and trA >= 0):
        raise ValueError(
            f"damping_mode='pi' needs non-negative mean traces of {which} (got tr G/dim={trG:.3g}, "
            f"tr A/dim={trA:.3g}); the factors must be PSD — use damping_mode='exact'."
        )
    if trG == 0 or trA == 0:
        return 1.0, torch.zeros_like(G), torch.zeros_like(A)
    return math.sqrt(trA / trG), G, A


def check_spd(eigs: Tensor, what: str) -> None:
    """Raise the ``non-SPD curvature`` error if an eigenvalue ``eigs`` of ``what`` is ``<= 0``."""
    if not bool((eigs > 0).all()):
        raise ValueError(
            f"non-SPD curvature: {what} has a non-positive eigenvalue ({float(eigs.min()):.3g}); "
            "the factors must be positive semi-definite — increase damping or check the factors."
        )


def generalized_eigh(B: Tensor, C: Tensor, nameB: str, nameC: str) -> Tuple[Tensor, Tensor]:
    """``X`` with ``X^T B X = I`` and ``X^T C X = diag(mu)`` for SPD ``B``: returns ``(mu, X)``
    (batched over leading dimensions).

    Diagonal (1-D) factors: a diagonal ``B`` is whitened by ``diag(B)^{-1/2}`` (no
    eigendecomposition of ``B``); with ``C`` diagonal too, ``X = diag(B)^{-1/2}`` is itself diagonal
    and returned 1-D (``mu = C / B``, nothing ``m x m`` formed); a diagonal ``C`` next to a dense
    ``B`` is made dense."""
    if B.dim() == 1:
        if not bool((B > 0).all()):
            raise ValueError(
                f"{nameB} must be positive definite for the simultaneous diagonalization "
                f"(smallest entry {float(B.min()):.3g}); increase damping or check the factors."
            )
        r = B.rsqrt()
        if C.dim() == 1:
            return C / B, r
        mu, U = safe_eigh(r[:, None] * C * r[None, :], f"whitened {nameC}")
        return mu, r[:, None] * U
    if C.dim() == 1:
        C = torch.diag(C)
    lb, Qb = safe_eigh(B, nameB)
    if not bool((lb > 0).all()):
        raise ValueError(
            f"{nameB} must be positive definite for the simultaneous diagonalization "
            f"(smallest eigenvalue {float(lb.min()):.3g}); increase damping or check the factors."
        )
    Wb = Qb * lb.rsqrt()[..., None, :]
    mu, U = safe_eigh(Wb.mT @ C @ Wb, f"whitened {nameC}")
    return mu, Wb @ U


def transpose_mul(Q: Tensor, V: Tensor) -> Tensor:
    """``Q^T V`` for a matrix, a block form ``[B, m, m]`` or a diagonal (1-D) ``Q``."""
    return Q[:, None] * V if Q.dim() == 1 else Q.mT @ V
