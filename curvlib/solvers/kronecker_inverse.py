r"""Damped inverses of one or two Kronecker products, applied to weight-shaped matrices.

:class:`KroneckerInverse` is the front: ``KroneckerInverse(terms, damping, damping_mode)`` checks the
terms and becomes an instance of the class of their kind, :class:`BiasInverse` (one-factor terms),
:class:`OneTermInverse` (``[[G, A]]``) or :class:`TwoTermInverse` (``[[G1, A1], [G2, A2]]``), each
of which sets up and applies its own inverse. The factor forms and the small decompositions they
share are in :mod:`curvlib.solvers.kronecker`.

Orientation (curvlib's ``p.kfac`` convention): a weight ``W`` [out, in] is flattened row-major,
``G`` is [out, out], ``A`` is [in, in] and ``kron(G, A) vec(V) = vec(G V A)`` (factors symmetric).

Inverted matrices (``λ = damping``):

* one term ``[[G, A]]``
    - ``"exact"``: ``kron(G, A) + λ I``  ->  ``Y = Qg [(Qg^T V Qa) / (lg la^T + λ)] Qa^T``.
    - ``"pi"``:    ``kron(G + (√λ/π) I, A + π√λ I)`` with ``π = sqrt((tr A / dim A) / (tr G / dim G))``
      (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored approximate
      curvature", §6.3), i.e. ``Y = (G + √λ/π I)^-1 V (A + π√λ I)^-1``.
* bias terms ``[[G]]`` (or several one-factor terms ``[[G1], [G2]]``): ``sum_i G_i + λ I``
  (both modes; there is no second factor to share the damping with).
* factor forms (docs/design.md §2), one term or bias terms: a **1-D** factor ``[m]`` is the diagonal
  matrix ``diag(F)`` (e.g. an Embedding's token frequencies): its eigendecomposition is itself,
  no ``m x m`` matrix is formed; factors with a **leading block dimension** ``G [B, m, m]``,
  ``A [B, n, n]`` mean ``blockdiag_b(kron(G[b], A[b]))`` over ``B`` consecutive slices of
  ``vec(V)``, i.e. ``V [out, in] = [B m, n]`` is viewed ``[B, m, n]`` and each block is inverted
  as one term (batched eigendecompositions; ``"pi"`` uses one ``π_b`` per block). A bias factor
  may be 1-D or ``[B, m, m]`` likewise (``V [B m]``). Two-term sums take the block form (all
  four factors ``[B, ., .]``: each block's two-term sum inverted as below, batched over the
  blocks; e.g. rank-2 KPSVD of a grouped convolution), or any mix of dense ``[m, m]`` and
  diagonal ``[m]`` factors (e.g. the KFAC of a tied weight, ``[[A_emb [V], G_emb [D, D]],
  [G_lin [V, V], A_lin [D, D]]]``: an Embedding's 1-D token frequencies and the Linear head's
  dense factors over the same ``[V, D]`` weight).
* two terms ``[[G1, A1], [G2, A2]]`` (KPSVD / deflation / Lanczos rank-2 approximations,
  Koroko et al. 2022, "Efficient approximations of the Fisher matrix in neural networks using
  Kronecker product singular value decomposition"; KFAC of a parameter used by two layers, one
  term per layer, in their forward order):
    - ``"pi"``: ``kron(G1 + (√λ/π) I, A1 + π√λ I) + kron(G2, A2)``, ``π`` from (G1, A1) as above.
      Inverted *directly and exactly* by simultaneous diagonalization: with
      ``G1d = G1 + √λ/π I`` and ``A1d = A1 + π√λ I`` (SPD), the generalized eigenproblems
      ``G2 x = μ G1d x`` and ``A2 y = ν A1d y`` give ``X^T G1d X = I, X^T G2 X = diag(μ)`` (same for
      ``Y``), so the matrix is ``kron(X, Y)^-T (I + μ ν^T) kron(X, Y)^-1`` and
      ``Y_out = X [(X^T V Y) / (1 + μ ν^T)] Y^T``: two small matmuls on each side. So the damping
      enters through the *first* term only, Tikhonov-split between its factors by its own π, and
      the second term is added undamped (for two PSD terms the matrix is then
      ``>= kron(G1, A1) + kron(G2, A2) + λ I``, with equality when ``G1 = A1 = 0``); swapping the
      terms changes the inverse. Diagonal (1-D) factors: a side whose two factors are both
      diagonal has a diagonal ``X`` (``X = diag(G1d)^{-1/2}``, ``μ = G2 / G1d``: nothing ``m x m``
      is formed or decomposed, e.g. the ``V`` side of a tied Embedding / Linear weight once both
      vocabulary factors are 1-D); a diagonal ``G1d`` next to a dense ``G2`` is whitened by
      ``diag(G1d)^{-1/2}`` (one ``eigh`` of the whitened ``G2`` instead of two); a diagonal
      ``G2`` next to a dense ``G1d`` is made dense. With a diagonal factor on one side in both
      terms the matrix is block-diagonal, ``blockdiag_v(G1_v A1d + G2_v A2)``: the inverse is
      applied block by block through ``Y`` and the 1-D ``μ`` (``O(m n^2)`` per product).
      **Indefinite sums** (``indefinite="clip"``, the default): the best rank-2 Kronecker
      approximation of a PSD block need not be PSD (the second term is in general indefinite),
      and ``1 + μ_i ν_j`` can be ``<= 0``. The Rayleigh quotient of the inverted matrix along the
      eigendirection ``x_i ⊗ y_j`` is ``(1 + μ_i ν_j) / (||x_i||^2 ||y_j||^2)``; each
      ``1 + μ_i ν_j`` is raised to the floor ``λ ||x_i||^2 ||y_j||^2`` (quotient ``= λ``, the
      damping) where it is below it. This changes nothing when ``kron(G1, A1) + kron(G2, A2)``
      is PSD: the π-damped matrix is then ``>= kron(G1, A1) + kron(G2, A2) + λ I >= λ I`` (``G1``,
      ``A1`` PSD), so every quotient is ``>= λ`` (pairs within a relative ``1e-3`` of the floor
      count as at the floor and are left alone: round-off of float32 factors puts the quotients of
      PSD sums up to ~5e-5 below ``λ`` where their null spaces meet). Otherwise the inverted matrix is the nearest one
      in the same simultaneously diagonalized family whose quotients are all ``>= λ``: the
      directions where the rank-2 approximation reports (spurious) negative or near-zero
      curvature are treated as damping-only directions, everything else is exact. The number of
      raised pairs is :attr:`KroneckerInverse.clipped` (the optimizers keep it per parameter in
      ``opt.state[p]["inverse_clipped"]``); the first clipping in a process is announced with a
      ``RuntimeWarning``. ``indefinite="raise"`` refuses such a sum instead, and ``λ = 0`` has no
      floor (it raises). (Koroko et al.'s code instead replaces ``μ, ν`` by ``|μ|, |ν|``, which
      changes the inverse of PD sums too.)
    - ``"exact"``: ``kron(G1, A1) + kron(G2, A2) + λ I`` — the same damping convention as the
      one-term ``"exact"`` mode, so ``λ`` is directly comparable with one-term KFAC. The damped
      identity ``λ I ⊗ I`` is a *third* Kronecker term: three Kronecker terms are in general not
      simultaneously diagonalizable (no Kronecker-structured eigenbasis exists), so this matrix has
      no closed-form Kronecker-cost inverse. It is solved to round-off
      (``tol``, default 1e-12 in float64 / 1e-6 in float32, relative residual) by batched
      preconditioned CG (:func:`curvlib.solvers.cg`, batched over the leading dimensions of ``V``)
      whose preconditioner is the exact ``"pi"`` inverse above (about 5-30
      iterations in our tests, fewer for small λ; each costs one application of both structured
      operators; a diagonal factor is applied as a row / column scaling). If the π-damped matrix is indefinite, the preconditioner falls back to the
      one-term exact inverse ``(kron(G1, A1) + λ I)^-1``. The exact mode is exact: an indefinite
      ``kron(G1, A1) + kron(G2, A2) + λ I`` is refused (a clear error from the solve), never
      clipped -- ``"pi"`` clips (above).
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ._linalg import check_damping, check_finite, default_tol
from .cg import cg
from .kronecker import (
    check_spd, damped_factor_inverse, dense_factor, factor_eig, generalized_eigh, inverse_from_eig, kron_matvec,
    left_mul, normalize_terms, pi_damping, right_mul, transpose_mul,
)

__all__ = ["KroneckerInverse", "BiasInverse", "OneTermInverse", "TwoTermInverse", "kron_matvec"]

_MODES = ("exact", "pi")
_INDEFINITE = ("clip", "raise")
#: whether the clipping of an indefinite two-term sum has been announced in this process
_announced = [False]
#: relative slack of the damping floor of two-term "pi" inverses (see ``TwoTermInverse._floor``)
_FLOOR_SLACK = 1e-3


class KroneckerInverse:
    """Callable ``P(V)`` applying the inverse of a damped (sum of) Kronecker product(s).

    Args:
        terms: ``[[G, A]]`` (weight), ``[[G]]`` (bias) or ``[[G1, A1], [G2, A2]]``; ``G`` [out, out],
            ``A`` [in, in], symmetric. A single term may be passed unnested (``p.kfac``).
        damping: ``λ >= 0``.
        damping_mode: ``"exact"`` or ``"pi"``; the matrices inverted are listed in the module docstring.
        tol, maxiter: only for two terms with ``"exact"`` (PCG stopping rule, see module docstring).
        indefinite: two terms with ``"pi"``: ``"clip"`` (default) raises the eigenvalues of an
            indefinite sum to the damping floor (module docstring), ``"raise"`` refuses it.

    The instance is of the class of the terms' kind (:class:`BiasInverse`, :class:`OneTermInverse`,
    :class:`TwoTermInverse`; :meth:`update` with terms of another kind changes it). Attributes of
    every kind: ``terms``, ``damping``, ``damping_mode``, ``dtype``, ``out_dim``, ``in_dim``
    (``None`` for a bias), ``blocks`` (``B`` of the block form, else ``None``), ``pi`` (the π of
    ``"pi"`` damping, ``None`` for a bias) and :attr:`clipped`, the number of eigenvalue pairs
    raised to the floor (0 unless two indefinite terms in ``"pi"`` mode).

    ``P(V)``: V ``[out, in]`` or ``[*B, out, in]`` (bias: ``[out]`` or ``[*B, out]``) -> same shape
    (``P(V, check=False)``: without checking ``V``).
    Eigendecompositions are computed once (constructor / :meth:`update`), so ``P(V)`` costs two
    small matmuls on each side.
    """

    #: ``"bias"``, ``"kron1"`` or ``"kron2"``
    kind: ClassVar[str] = ""

    def __init__(
        self,
        terms,
        damping: float,
        damping_mode: str = "exact",
        *,
        tol: Optional[float] = None,
        maxiter: int = 200,
        indefinite: str = "clip",
    ):
        if indefinite not in _INDEFINITE:
            raise ValueError(f"KroneckerInverse: indefinite must be one of {_INDEFINITE}, got {indefinite!r}.")
        self.tol = tol
        self.maxiter = int(maxiter)
        self.indefinite = indefinite
        self.update(terms, damping, damping_mode)

    # ------------------------------------------------------------------ setup
    def update(self, terms, damping: Optional[float] = None, damping_mode: Optional[str] = None) -> "KroneckerInverse":
        """Recompute the cached decompositions for new factors and/or damping; returns ``self``."""
        if damping is None:
            damping = self.damping
        if damping_mode is None:
            damping_mode = getattr(self, "damping_mode", "exact")
        if damping_mode not in _MODES:
            raise ValueError(f"damping_mode must be one of {_MODES}, got {damping_mode!r}.")
        self.damping = check_damping(damping)
        self.damping_mode = damping_mode
        self.terms = normalize_terms(terms)
        nf = {len(t) for t in self.terms}
        if len(nf) != 1:
            raise ValueError("KroneckerInverse: all terms must have the same number of factors (1 or 2).")
        dtypes = {f.dtype for t in self.terms for f in t}
        if len(dtypes) != 1:
            raise ValueError(f"KroneckerInverse: all factors must share one dtype, got {sorted(map(str, dtypes))}.")
        self.dtype: torch.dtype = dtypes.pop()
        self.pi: Optional[float] = None
        self.blocks: Optional[int] = None
        self.clipped = 0
        ndims = [f.dim() for t in self.terms for f in t]
        if (len(self.terms) > 1 and nf == {2}) and 3 in ndims and len(set(ndims)) != 1:
            raise ValueError(
                "KroneckerInverse: the factors of a two-term sum must all be block [B, m, m], or "
                f"each dense [m, m] or diagonal [m], got dims {ndims}."
            )
        if nf == {2} and (3 in ndims) and any(d != 3 for d in ndims):
            raise ValueError(
                "KroneckerInverse: a block-form term needs both factors [B, m, m] and [B, n, n], "
                f"got dims {ndims}."
            )
        if nf == {1}:
            kind = BiasInverse
        elif len(self.terms) == 1:
            kind = OneTermInverse
        elif len(self.terms) == 2:
            kind = TwoTermInverse
        else:
            raise ValueError(
                f"KroneckerInverse supports one or two [G, A] terms, got {len(self.terms)}; "
                "more terms are not simultaneously diagonalizable — use curvlib.solvers.cg."
            )
        self.__class__ = kind  # the front becomes the class of its kind
        self._setup()
        return self

    def _setup(self) -> None:
        """The cached decompositions of ``self.terms`` (each kind its own)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ apply
    def __call__(self, V: Tensor, *, check: bool = True) -> Tensor:
        """``P(V)``; ``check=False`` skips the shape and finiteness check of ``V`` (one reduction
        and a host synchronisation per call) for a caller that has checked it: the optimizers
        check every gradient of a step at once, and then each direction."""
        if check:
            self._check_v(V)
        return self._solve(V.to(self.dtype))

    def _solve(self, V: Tensor) -> Tensor:
        """``P(V)`` for a checked ``V`` in the factors' dtype: the structured inverse."""
        if self.blocks is None:
            return self._apply(V)
        return self._apply(self._block_view(V)).reshape(V.shape)

    def _apply(self, V: Tensor) -> Tensor:
        """The structured inverse on ``V`` (block form: on :meth:`_block_view`)."""
        raise NotImplementedError

    def _check_v(self, V: Tensor) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"KroneckerInverse expects a tensor, got {type(V).__name__}.")
        ok = V.dim() >= 2 and tuple(V.shape[-2:]) == (self.out_dim, self.in_dim)
        if not ok:
            want = f"[out, in] or [B, out, in] with (out, in)=({self.out_dim}, {self.in_dim})"
            raise ValueError(f"KroneckerInverse: V has shape {tuple(V.shape)}, expected {want}.")
        check_finite(V, "KroneckerInverse input V")

    def _block_view(self, V: Tensor) -> Tensor:
        """The block form's view of a weight-shaped ``V``: ``[*, B m, n]`` as ``[*, B, m, n]``."""
        return V.reshape(*V.shape[:-2], self.blocks, -1, self.in_dim)

    def _apply_eig(self, V: Tensor) -> Tensor:
        """``Qg [(Qg^T V Qa) * W] Qa^T`` from the cached bases ``Qg``, ``Qa`` (``None``: the
        identity, the eigenbasis of a diagonal factor; 1-D: a diagonal basis, e.g. a diagonal
        factor whitened by another) and weights ``W`` (block form: batched over the blocks)."""
        Qg, Qa = self._Qg, self._Qa
        dense = Qg is not None and Qa is not None and Qg.dim() == 2 and Qa.dim() == 2
        if dense and self.blocks is None:
            return Qg @ ((Qg.T @ V @ Qa) * self._W) @ Qa.T
        T = V if Qg is None else transpose_mul(Qg, V)
        T = T if Qa is None else right_mul(T, Qa)
        T = T * self._W
        T = T if Qa is None else left_mul(Qa, T.mT).mT  # T Qa^T
        return T if Qg is None else left_mul(Qg, T)

    # ------------------------------------------------------------------ dense (tests / debugging)
    def damped_matrix(self) -> Tensor:
        """The dense matrix that ``P`` inverts (``[out*in, out*in]``, row-major vec); small sizes only."""
        raise NotImplementedError

    def _eye(self) -> Tensor:
        n = self.out_dim * self.in_dim
        return torch.eye(n, dtype=self.dtype, device=self.terms[0][0].device)

    def __repr__(self) -> str:
        dims = f"out={self.out_dim}" + (f", in={self.in_dim}" if self.in_dim is not None else "")
        return (
            f"KroneckerInverse(kind={self.kind}, {dims}, terms={len(self.terms)}, "
            f"damping={self.damping:g}, damping_mode={self.damping_mode!r})"
        )


class BiasInverse(KroneckerInverse):
    """``(sum_i G_i + λ I)^-1`` for one-factor terms ``[[G1], [G2], ...]`` (both damping modes;
    there is no second factor to share the damping with). ``V``: ``[*, out]``."""

    kind = "bias"

    def _setup(self) -> None:
        if len({tuple(t[0].shape) for t in self.terms}) != 1:
            raise ValueError("KroneckerInverse: all bias factors G_i must have the same shape.")
        G = sum(t[0] for t in self.terms)
        if G.dim() == 3:
            self.blocks = G.shape[0]
        self.out_dim, self.in_dim = (G.shape[0] * G.shape[1] if G.dim() == 3 else G.shape[0]), None
        # (G + λI)^-1 by Cholesky, as the weights' "pi" factors (eigh of a 512 x 512 factor costs
        # about 5x a Cholesky inverse on CPU); eigh only when Cholesky fails (it then reports a
        # non-SPD factor, or falls back to float64)
        self._Ginv = damped_factor_inverse(G, self.damping) if G.dim() > 1 else None
        if self._Ginv is not None:
            self._Qg = None
            return
        lg, self._Qg = factor_eig(G, "bias factor G")
        denom = lg + self.damping
        check_spd(denom, "G + damping*I")
        self._W = 1.0 / denom

    def _check_v(self, V: Tensor) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"KroneckerInverse expects a tensor, got {type(V).__name__}.")
        if not (V.dim() >= 1 and V.shape[-1] == self.out_dim):
            want = f"[out] or [B, out] with out={self.out_dim}"
            raise ValueError(f"KroneckerInverse: V has shape {tuple(V.shape)}, expected {want}.")
        check_finite(V, "KroneckerInverse input V")

    def _block_view(self, V: Tensor) -> Tensor:
        """``[*, B m]`` as ``[*, B, m]``."""
        return V.reshape(*V.shape[:-1], self.blocks, -1)

    def _apply(self, V: Tensor) -> Tensor:
        if self._Ginv is not None:  # symmetric: V Ginv = (Ginv V^T)^T
            if self.blocks is not None:
                return (V.unsqueeze(-2) @ self._Ginv).squeeze(-2)
            return V @ self._Ginv
        Q = self._Qg
        if Q is None:
            return V * self._W
        if self.blocks is not None:
            V = V.unsqueeze(-2)
            return (((V @ Q) * self._W.unsqueeze(-2)) @ Q.mT).squeeze(-2)
        return ((V @ Q) * self._W) @ Q.T

    def damped_matrix(self) -> Tensor:
        G = dense_factor(sum(t[0] for t in self.terms))
        return G + self.damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


class OneTermInverse(KroneckerInverse):
    """The inverse of one damped Kronecker product ``[[G, A]]`` (module docstring): ``"exact"``
    ``kron(G, A) + λ I`` by the factors' eigenbases, ``"pi"`` ``kron(G + √λ/π I, A + π√λ I)`` by
    the two damped factor inverses. Dense, diagonal (1-D) or block ``[B, ., .]`` factors."""

    kind = "kron1"

    def _setup(self) -> None:
        G, A = self.terms[0]
        if G.dim() == 3:
            if A.shape[0] != G.shape[0]:
                raise ValueError(
                    f"KroneckerInverse: block factors G {tuple(G.shape)} and A {tuple(A.shape)} "
                    "must have the same number of blocks."
                )
            self.blocks = G.shape[0]
            self.out_dim, self.in_dim = G.shape[0] * G.shape[1], A.shape[-1]
        else:
            self.out_dim, self.in_dim = G.shape[0], A.shape[0]
        lam = self.damping
        if self.damping_mode == "exact":
            lg, self._Qg = factor_eig(G, "Kronecker factor G")
            la, self._Qa = factor_eig(A, "Kronecker factor A")
            denom = lg[..., :, None] * la[..., None, :] + lam
            check_spd(denom, "kron(G, A) + damping*I")
            self._W = 1.0 / denom
            return
        # "pi": the weights are separable, so P(V) = Ginv V Ainv (two matmuls) with the damped
        # factor inverses, by Cholesky (about 4x faster than eigh for a 784 x 784 factor on CPU);
        # eigh only when a Cholesky factorization fails (it falls back to float64 and reports a
        # non-SPD factor)
        self.pi, G, A = pi_damping(G, A, "G and A")
        self._pi_factors = (G, A)
        pi = self.pi[:, None] if isinstance(self.pi, Tensor) else self.pi
        cg_, ca = math.sqrt(lam) / pi, pi * math.sqrt(lam)
        self._Qg = self._Qa = None
        if G.dim() == 3:  # block shifts [B, 1] -> [B, 1, 1] for matrices
            self._Ginv = damped_factor_inverse(G, cg_[..., None])
            self._Ainv = damped_factor_inverse(A, ca[..., None]) if self._Ginv is not None else None
        else:
            self._Ginv = damped_factor_inverse(G, cg_)
            self._Ainv = damped_factor_inverse(A, ca) if self._Ginv is not None else None
        if self._Ginv is not None and self._Ainv is not None:
            return
        lg, Qg = factor_eig(G, "Kronecker factor G")
        la, Qa = factor_eig(A, "Kronecker factor A")
        check_spd(lg + cg_, "G + sqrt(damping)/pi*I")
        check_spd(la + ca, "A + pi*sqrt(damping)*I")
        self._Ginv = inverse_from_eig(lg + cg_, Qg)
        self._Ainv = inverse_from_eig(la + ca, Qa)

    def _apply(self, V: Tensor) -> Tensor:
        if self.damping_mode == "pi":
            return right_mul(left_mul(self._Ginv, V), self._Ainv)
        return self._apply_eig(V)

    def damped_matrix(self) -> Tensor:
        lam, eye = self.damping, self._eye()
        if self.blocks is not None:
            G, A = self.terms[0] if self.damping_mode == "exact" else self._pi_factors
            if self.damping_mode == "exact":
                return torch.block_diag(*[torch.kron(g, a) for g, a in zip(G, A)]) + lam * eye
            s, pis = math.sqrt(lam), self.pi.tolist()
            return torch.block_diag(*[
                torch.kron(g + s / p * torch.eye(g.shape[0], dtype=g.dtype, device=g.device),
                           a + s * p * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
                for g, a, p in zip(G, A, pis)
            ])
        G, A = map(dense_factor, self.terms[0] if self.damping_mode == "exact" else self._pi_factors)
        if self.damping_mode == "exact":
            return torch.kron(G, A) + lam * eye
        s = math.sqrt(lam)
        return torch.kron(
            G + s / self.pi * torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
            A + s * self.pi * torch.eye(A.shape[0], dtype=A.dtype, device=A.device),
        )


class TwoTermInverse(KroneckerInverse):
    """The inverse of a damped two-term sum ``[[G1, A1], [G2, A2]]`` (module docstring): ``"pi"``
    exactly by simultaneous diagonalization (indefinite sums clipped at the damping floor or
    refused, ``indefinite``), ``"exact"`` ``kron(G1, A1) + kron(G2, A2) + λ I`` by PCG
    preconditioned with the ``"pi"`` inverse. Block ``[B, ., .]`` factors, or dense and diagonal
    (1-D) ones mixed."""

    kind = "kron2"

    def _setup(self) -> None:
        (G1, A1), (G2, A2) = self.terms
        if _size(G1) != _size(G2) or _size(A1) != _size(A2):
            raise ValueError(
                f"KroneckerInverse: the two terms must have matching factor sizes, got G {tuple(G1.shape)}/"
                f"{tuple(G2.shape)} and A {tuple(A1.shape)}/{tuple(A2.shape)}."
            )
        self._raise: Optional[Tensor] = None  # "pi": what the floor added to 1 + μν
        if G1.dim() == 3:  # block form: every block's two-term sum, batched over the blocks
            if A1.shape[0] != G1.shape[0]:
                raise ValueError(
                    f"KroneckerInverse: block factors G {tuple(G1.shape)} and A {tuple(A1.shape)} "
                    "must have the same number of blocks."
                )
            self.blocks = G1.shape[0]
        m, n = G1.shape[-1], A1.shape[-1]
        self.out_dim, self.in_dim = (G1.shape[0] * m if G1.dim() == 3 else m), n
        lam = self.damping
        if self.damping_mode == "pi":
            self.pi, G1, A1 = pi_damping(G1, A1, "G1 and A1")
        else:  # pi only shapes the preconditioner of the exact solve: fall back to 1 if undefined
            try:
                self.pi, _, _ = pi_damping(G1, A1, "G1 and A1")
            except ValueError:
                self.pi = 1.0 if G1.dim() == 2 else torch.ones(G1.shape[0], dtype=G1.dtype, device=G1.device)
        pi = self.pi[:, None, None] if isinstance(self.pi, Tensor) else self.pi  # per block
        self._G1d = _shifted(G1, math.sqrt(lam) / pi)
        self._A1d = _shifted(A1, pi * math.sqrt(lam))
        mu, self._Qg = generalized_eigh(self._G1d, G2, "G1 + sqrt(damping)/pi*I", "G2")
        nu, self._Qa = generalized_eigh(self._A1d, A2, "A1 + pi*sqrt(damping)*I", "A2")
        denom = 1.0 + mu[..., :, None] * nu[..., None, :]
        if self.damping_mode == "exact" and not bool((denom > 0).all()):
            # the pi-damped two-term matrix is indefinite: precondition the exact solve with the
            # one-term exact inverse (kron(G1, A1) + λ I)^-1 instead.
            lg, self._Qg = factor_eig(G1, "Kronecker factor G1")
            la, self._Qa = factor_eig(A1, "Kronecker factor A1")
            denom = lg[..., :, None] * la[..., None, :] + lam
            check_spd(denom, "kron(G1, A1) + damping*I (preconditioner of the exact two-term solve)")
        else:
            if self.damping_mode == "pi" and self.indefinite == "clip" and lam > 0:
                denom = self._floor(denom, lam)
            check_spd(denom, "kron(G1 + sqrt(damping)/pi I, A1 + pi sqrt(damping) I) + kron(G2, A2)")
        self._W = 1.0 / denom

    def _floor(self, denom: Tensor, lam: float) -> Tensor:
        """Raise ``1 + μ_i ν_j`` to ``λ ||x_i||^2 ||y_j||^2`` where below (module docstring)."""
        floor = lam * _column_norms2(self._Qg)[..., :, None] * _column_norms2(self._Qa)[..., None, :]
        # pairs within _FLOOR_SLACK of the floor are left alone: a PSD sum whose null directions
        # meet those of G1 and A1 (factors of a rank-deficient batch) has quotients of exactly λ
        # there, which round-off of float32 factors puts up to ~5e-5 below (measured on the
        # autoencoder's 1000-wide layers) -- they are at the floor, not clipped
        low = denom < floor * (1 - _FLOOR_SLACK)
        self.clipped = int(low.sum())
        if not self.clipped:
            return denom
        self._raise = torch.where(low, floor - denom, torch.zeros_like(denom))
        if not _announced[0]:
            _announced[0] = True
            warnings.warn(
                f"KroneckerInverse: the two-term Kronecker curvature kron(G1, A1) + kron(G2, A2) is "
                f"indefinite (a best rank-2 Kronecker approximation need not be PSD): {self.clipped} of "
                f"{denom.numel()} eigenvalues 1 + mu_i nu_j of the pi-damped matrix in its Kronecker "
                "eigenbasis were raised to the damping floor (Rayleigh quotient = damping along "
                "x_i (x) y_j). Announced once per process; KroneckerInverse.clipped and the optimizers' "
                "opt.state[p]['inverse_clipped'] count them. indefinite='raise' refuses such sums.",
                RuntimeWarning,
                stacklevel=4,
            )
        return torch.maximum(denom, floor)

    def _apply(self, V: Tensor) -> Tensor:
        return self._apply_eig(V)

    def _solve(self, V: Tensor) -> Tensor:
        if self.damping_mode == "exact":
            return self._pcg(V)
        return super()._solve(V)

    def _kron2_matvec(self, V: Tensor) -> Tensor:
        """``G1 V A1 + G2 V A2 + λ V`` (block form: ``V [*, B, m, n]``, per block)."""
        (G1, A1), (G2, A2) = self.terms
        return right_mul(left_mul(G1, V), A1) + right_mul(left_mul(G2, V), A2) + self.damping * V

    def _pcg(self, B: Tensor) -> Tensor:
        """Batched PCG (:func:`curvlib.solvers.cg`, one system per leading index) on
        ``G1 X A1 + G2 X A2 + λ X = B``, preconditioned by the structured inverse, which also
        gives the initial guess; relative tolerance per system, no absolute floor."""
        tol = self.tol if self.tol is not None else default_tol(B.dtype, 1e-12, 1e-6)
        shape = B.shape
        if self.blocks is not None:  # [*, B m, n] -> [*, B, m, n]: one system per block too
            B = self._block_view(B)
        try:
            X, info = cg(
                self._kron2_matvec, B, x0=self._apply(B), tol=tol, atol=0.0,
                maxiter=self.maxiter, M=self._apply, batch_dims=B.dim() - 2,
            )
        except ValueError as e:
            if "non-SPD" not in str(e):
                raise
            raise ValueError(
                "non-SPD curvature: kron(G1, A1) + kron(G2, A2) + damping*I is not positive definite "
                f"(exact two-term solve: {e}); increase damping or use damping_mode='pi'."
            ) from e
        if not info.converged:
            warnings.warn(
                f"KroneckerInverse (two terms, damping_mode='exact'): PCG did not reach relative residual "
                f"{tol:g} in {self.maxiter} iterations; increase maxiter/damping or use damping_mode='pi'.",
                RuntimeWarning,
                stacklevel=4,
            )
        return X.reshape(shape)

    def damped_matrix(self) -> Tensor:
        if self.blocks is not None:  # block form: the blocks' matrices on the diagonal
            return torch.block_diag(*[self._kron2_dense(b) for b in range(self.blocks)])
        return self._kron2_dense(None)

    def _kron2_dense(self, b: Optional[int]) -> Tensor:
        """The dense two-term matrix (of block ``b`` in the block form)."""
        at = (lambda F: F) if b is None else (lambda F: F[b])
        (G1, A1), (G2, A2) = [[dense_factor(at(F)) for F in t] for t in self.terms]
        if self.damping_mode == "exact":
            eye = torch.eye(G1.shape[0] * A1.shape[0], dtype=self.dtype, device=G1.device)
            return torch.kron(G1, A1) + torch.kron(G2, A2) + self.damping * eye
        G1d, A1d = dense_factor(at(self._G1d)), dense_factor(at(self._A1d))
        M = torch.kron(G1d, A1d) + torch.kron(G2, A2)
        if self._raise is not None:  # + kron(X, Y)^-T diag(raise) kron(X, Y)^-1, X^-T = G1d X
            B = torch.kron(G1d @ dense_factor(at(self._Qg)), A1d @ dense_factor(at(self._Qa)))
            M = M + (B * at(self._raise).reshape(-1)) @ B.T
        return M


def _size(F: Tensor) -> tuple:
    """``(blocks..., m)`` of a factor ``[m]``, ``[m, m]`` or ``[B, m, m]``: the dimension it acts on."""
    return tuple(F.shape[:-2]) + (F.shape[-1],)


def _shifted(F: Tensor, c) -> Tensor:
    """``F + c I`` for a dense, block (``c`` a number or ``[B, 1, 1]``) or diagonal (1-D) factor."""
    if F.dim() == 1:
        return F + c
    return F + c * torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)


def _column_norms2(X: Tensor) -> Tensor:
    """``||x_i||^2`` of the columns of a basis ``X`` (1-D: a diagonal basis, ``X_ii^2``)."""
    return X.square() if X.dim() == 1 else X.square().sum(-2)
