r"""Damped inverses of one or two Kronecker products, applied to weight-shaped matrices.

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
  may be 1-D or ``[B, m, m]`` likewise (``V [B m]``). Two-term sums take dense 2-D factors or
  the block form (``[[G1 [B, m, m], A1 [B, n, n]], [G2, A2]]``: each block's two-term sum
  inverted as below, batched over the blocks; e.g. rank-2 KPSVD of a grouped convolution), not
  1-D factors.
* two terms ``[[G1, A1], [G2, A2]]`` (KPSVD / deflation / Lanczos rank-2 approximations,
  Koroko et al. 2022, "Efficient approximations of the Fisher matrix in neural networks using
  Kronecker product singular value decomposition"):
    - ``"pi"``: ``kron(G1 + (√λ/π) I, A1 + π√λ I) + kron(G2, A2)``, ``π`` from (G1, A1) as above.
      Inverted *directly and exactly* by simultaneous diagonalization: with
      ``G1d = G1 + √λ/π I`` and ``A1d = A1 + π√λ I`` (SPD), the generalized eigenproblems
      ``G2 x = μ G1d x`` and ``A2 y = ν A1d y`` give ``X^T G1d X = I, X^T G2 X = diag(μ)`` (same for
      ``Y``), so the matrix is ``kron(X, Y)^-T (I + μ ν^T) kron(X, Y)^-1`` and
      ``Y_out = X [(X^T V Y) / (1 + μ ν^T)] Y^T``: two small matmuls on each side.
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
      operators). If the π-damped matrix is indefinite, the preconditioner falls back to the
      one-term exact inverse ``(kron(G1, A1) + λ I)^-1``. The exact mode is exact: an indefinite
      ``kron(G1, A1) + kron(G2, A2) + λ I`` is refused (a clear error from the solve), never
      clipped -- ``"pi"`` clips (above).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from ._linalg import all_finite, check_damping, check_finite, default_tol, safe_eigh
from .cg import cg

__all__ = ["KroneckerInverse", "kron_matvec"]

_MODES = ("exact", "pi")
_INDEFINITE = ("clip", "raise")
#: whether the clipping of an indefinite two-term sum has been announced in this process
_announced = [False]
#: relative slack of the damping floor of two-term "pi" inverses (see ``_floor``)
_FLOOR_SLACK = 1e-3


def _normalize_terms(terms) -> List[List[Tensor]]:
    """Accept ``[G, A]`` / ``[G]`` (one term, e.g. ``p.kfac``) or ``[[G1, A1], [G2, A2]]``."""
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

    After construction, :attr:`clipped` is the number of eigenvalue pairs raised to the floor
    (0 unless two indefinite terms in ``"pi"`` mode).

    ``P(V)``: V ``[out, in]`` or ``[*B, out, in]`` (bias: ``[out]`` or ``[*B, out]``) -> same shape.
    Eigendecompositions are computed once (constructor / :meth:`update`), so ``P(V)`` costs two
    small matmuls on each side.
    """

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
        self.terms = _normalize_terms(terms)
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
        self._raise: Optional[Tensor] = None  # two terms, "pi": what the floor added to 1 + μν
        ndims = [f.dim() for t in self.terms for f in t]
        if (len(self.terms) > 1 and nf == {2}) and any(d == 1 for d in ndims):
            raise NotImplementedError(
                "KroneckerInverse: two-term sums need dense [m, m] or block [B, m, m] factors; "
                f"diagonal (1-D) factors are supported for one term or bias terms, got dims {ndims} "
                "(e.g. an Embedding's token frequencies: use one term, KFAC)."
            )
        if (len(self.terms) > 1 and nf == {2}) and len(set(ndims)) != 1:
            raise ValueError(
                "KroneckerInverse: the factors of a two-term sum must all be dense [m, m] or all "
                f"block [B, m, m], got dims {ndims}."
            )
        if nf == {2} and (3 in ndims) and any(d != 3 for d in ndims):
            raise ValueError(
                "KroneckerInverse: a block-form term needs both factors [B, m, m] and [B, n, n], "
                f"got dims {ndims}."
            )
        if nf == {1}:
            self._setup_bias()
        elif len(self.terms) == 1:
            self._setup_one()
        elif len(self.terms) == 2:
            self._setup_two()
        else:
            raise ValueError(
                f"KroneckerInverse supports one or two [G, A] terms, got {len(self.terms)}; "
                "more terms are not simultaneously diagonalizable — use curvlib.solvers.cg."
            )
        return self

    def _setup_bias(self) -> None:
        if len({tuple(t[0].shape) for t in self.terms}) != 1:
            raise ValueError("KroneckerInverse: all bias factors G_i must have the same shape.")
        self.kind = "bias"
        G = sum(t[0] for t in self.terms)
        if G.dim() == 3:
            self.blocks = G.shape[0]
        self.out_dim, self.in_dim = (G.shape[0] * G.shape[1] if G.dim() == 3 else G.shape[0]), None
        # (G + λI)^-1 by Cholesky, as the weights' "pi" factors (eigh of a 512 x 512 factor costs
        # about 5x a Cholesky inverse on CPU); eigh only when Cholesky fails (it then reports a
        # non-SPD factor, or falls back to float64)
        self._Ginv = _damped_inverse(G, self.damping) if G.dim() > 1 else None
        if self._Ginv is not None:
            self._Qg = None
            return
        lg, self._Qg = _eig(G, "bias factor G")
        denom = lg + self.damping
        self._check_spd(denom, "G + damping*I")
        self._W = 1.0 / denom

    @staticmethod
    def _pi(G: Tensor, A: Tensor, which: str):
        """``(π, G, A)``: ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (a tensor ``[B]`` for block
        factors) and the factors to damp. A PSD factor with zero trace is zero, and so is its
        Kronecker product (a dead ReLU channel ahead of a depthwise convolution zeroes its group's
        ``A``): there ``π = 1`` and both factors are returned zeroed, so that the π-damped term is
        ``(√λ I) ⊗ (√λ I) = λ I``, the damped zero curvature (the limit of the π rule). A negative
        trace (a non-PSD factor) raises."""
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
        trG = float(_diag(G).sum()) / G.shape[0]
        trA = float(_diag(A).sum()) / A.shape[0]
        if not (trG >= 0 and trA >= 0):
            raise ValueError(
                f"damping_mode='pi' needs non-negative mean traces of {which} (got tr G/dim={trG:.3g}, "
                f"tr A/dim={trA:.3g}); the factors must be PSD — use damping_mode='exact'."
            )
        if trG == 0 or trA == 0:
            return 1.0, torch.zeros_like(G), torch.zeros_like(A)
        return math.sqrt(trA / trG), G, A

    def _setup_one(self) -> None:
        G, A = self.terms[0]
        self.kind = "kron1"
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
            lg, self._Qg = _eig(G, "Kronecker factor G")
            la, self._Qa = _eig(A, "Kronecker factor A")
            denom = lg[..., :, None] * la[..., None, :] + lam
            self._check_spd(denom, "kron(G, A) + damping*I")
            self._W = 1.0 / denom
            return
        # "pi": the weights are separable, so P(V) = Ginv V Ainv (two matmuls) with the damped
        # factor inverses, by Cholesky (about 4x faster than eigh for a 784 x 784 factor on CPU);
        # eigh only when a Cholesky factorization fails (it falls back to float64 and reports a
        # non-SPD factor)
        self.pi, G, A = self._pi(G, A, "G and A")
        self._pi_factors = (G, A)
        pi = self.pi[:, None] if isinstance(self.pi, Tensor) else self.pi
        cg_, ca = math.sqrt(lam) / pi, pi * math.sqrt(lam)
        self._Qg = self._Qa = None
        if G.dim() == 3:  # block shifts [B, 1] -> [B, 1, 1] for matrices
            self._Ginv = _damped_inverse(G, cg_[..., None])
            self._Ainv = _damped_inverse(A, ca[..., None]) if self._Ginv is not None else None
        else:
            self._Ginv = _damped_inverse(G, cg_)
            self._Ainv = _damped_inverse(A, ca) if self._Ginv is not None else None
        if self._Ginv is not None and self._Ainv is not None:
            return
        lg, Qg = _eig(G, "Kronecker factor G")
        la, Qa = _eig(A, "Kronecker factor A")
        self._check_spd(lg + cg_, "G + sqrt(damping)/pi*I")
        self._check_spd(la + ca, "A + pi*sqrt(damping)*I")
        self._Ginv = _inverse_from_eig(lg + cg_, Qg)
        self._Ainv = _inverse_from_eig(la + ca, Qa)

    @staticmethod
    def _generalized(B: Tensor, C: Tensor, nameB: str, nameC: str):
        """X with ``X^T B X = I`` and ``X^T C X = diag(mu)`` for SPD ``B``: returns ``(mu, X)``."""
        lb, Qb = safe_eigh(B, nameB)
        if not bool((lb > 0).all()):
            raise ValueError(
                f"{nameB} must be positive definite for the simultaneous diagonalization "
                f"(smallest eigenvalue {float(lb.min()):.3g}); increase damping or check the factors."
            )
        Wb = Qb * lb.rsqrt()[..., None, :]
        mu, U = safe_eigh(Wb.mT @ C @ Wb, f"whitened {nameC}")
        return mu, Wb @ U

    def _setup_two(self) -> None:
        (G1, A1), (G2, A2) = self.terms
        if G1.shape != G2.shape or A1.shape != A2.shape:
            raise ValueError(
                f"KroneckerInverse: the two terms must have matching factor sizes, got G {tuple(G1.shape)}/"
                f"{tuple(G2.shape)} and A {tuple(A1.shape)}/{tuple(A2.shape)}."
            )
        self.kind = "kron2"
        if G1.dim() == 3:  # block form: every block's two-term sum, batched over the blocks
            if A1.shape[0] != G1.shape[0]:
                raise ValueError(
                    f"KroneckerInverse: block factors G {tuple(G1.shape)} and A {tuple(A1.shape)} "
                    "must have the same number of blocks."
                )
            self.blocks = G1.shape[0]
        m, n = G1.shape[-1], A1.shape[-1]
        self.out_dim, self.in_dim = G1.shape[:-1].numel(), n
        lam = self.damping
        if self.damping_mode == "pi":
            self.pi, G1, A1 = self._pi(G1, A1, "G1 and A1")
        else:  # pi only shapes the preconditioner of the exact solve: fall back to 1 if undefined
            try:
                self.pi, _, _ = self._pi(G1, A1, "G1 and A1")
            except ValueError:
                self.pi = 1.0 if G1.dim() == 2 else torch.ones(G1.shape[0], dtype=G1.dtype, device=G1.device)
        pi = self.pi[:, None, None] if isinstance(self.pi, Tensor) else self.pi  # per block
        eye_g = torch.eye(m, dtype=G1.dtype, device=G1.device)
        eye_a = torch.eye(n, dtype=A1.dtype, device=A1.device)
        self._G1d = G1 + (math.sqrt(lam) / pi) * eye_g
        self._A1d = A1 + (pi * math.sqrt(lam)) * eye_a
        mu, self._Qg = self._generalized(self._G1d, G2, "G1 + sqrt(damping)/pi*I", "G2")
        nu, self._Qa = self._generalized(self._A1d, A2, "A1 + pi*sqrt(damping)*I", "A2")
        denom = 1.0 + mu[..., :, None] * nu[..., None, :]
        if self.damping_mode == "exact" and not bool((denom > 0).all()):
            # the pi-damped two-term matrix is indefinite: precondition the exact solve with the
            # one-term exact inverse (kron(G1, A1) + λ I)^-1 instead.
            lg, self._Qg = safe_eigh(G1, "Kronecker factor G1")
            la, self._Qa = safe_eigh(A1, "Kronecker factor A1")
            denom = lg[..., :, None] * la[..., None, :] + lam
            self._check_spd(denom, "kron(G1, A1) + damping*I (preconditioner of the exact two-term solve)")
        else:
            if self.damping_mode == "pi" and self.indefinite == "clip" and lam > 0:
                denom = self._floor(denom, lam)
            self._check_spd(denom, "kron(G1 + sqrt(damping)/pi I, A1 + pi sqrt(damping) I) + kron(G2, A2)")
        self._W = 1.0 / denom

    def _floor(self, denom: Tensor, lam: float) -> Tensor:
        """Raise ``1 + μ_i ν_j`` to ``λ ||x_i||^2 ||y_j||^2`` where below (module docstring)."""
        floor = lam * self._Qg.square().sum(-2)[..., :, None] * self._Qa.square().sum(-2)[..., None, :]
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

    @staticmethod
    def _check_spd(eigs: Tensor, what: str) -> None:
        if not bool((eigs > 0).all()):
            raise ValueError(
                f"non-SPD curvature: {what} has a non-positive eigenvalue ({float(eigs.min()):.3g}); "
                "the factors must be positive semi-definite — increase damping or check the factors."
            )

    # ------------------------------------------------------------------ apply
    def _check_v(self, V: Tensor) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"KroneckerInverse expects a tensor, got {type(V).__name__}.")
        if self.kind == "bias":
            ok = V.dim() >= 1 and V.shape[-1] == self.out_dim
            want = f"[out] or [B, out] with out={self.out_dim}"
        else:
            ok = V.dim() >= 2 and tuple(V.shape[-2:]) == (self.out_dim, self.in_dim)
            want = f"[out, in] or [B, out, in] with (out, in)=({self.out_dim}, {self.in_dim})"
        if not ok:
            raise ValueError(f"KroneckerInverse: V has shape {tuple(V.shape)}, expected {want}.")
        check_finite(V, "KroneckerInverse input V")

    def _apply_structured(self, V: Tensor) -> Tensor:
        if self.blocks is not None:  # block form: [*, B m, n] viewed [*, B, m, n]
            shape = V.shape
            tail = (self.blocks, -1) if self.kind == "bias" else (self.blocks, -1, self.in_dim)
            V = V.reshape(*shape[: V.dim() - (1 if self.kind == "bias" else 2)], *tail)
            return self._apply_dense_or_diag(V).reshape(shape)
        return self._apply_dense_or_diag(V)

    def _apply_dense_or_diag(self, V: Tensor) -> Tensor:
        if self.kind == "bias":
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
        if self.kind == "kron1" and self.damping_mode == "pi":
            return _right(_left(self._Ginv, V), self._Ainv)
        Qg, Qa = self._Qg, self._Qa
        if Qg is not None and Qa is not None and self.blocks is None:
            return Qg @ ((Qg.T @ V @ Qa) * self._W) @ Qa.T
        T = V if Qg is None else Qg.mT @ V
        T = T if Qa is None else T @ Qa
        T = T * self._W
        T = T if Qa is None else T @ Qa.mT
        return T if Qg is None else Qg @ T

    def _kron2_matvec(self, V: Tensor) -> Tensor:
        """``G1 V A1 + G2 V A2 + λ V`` (block form: ``V [*, B, m, n]``, per block)."""
        (G1, A1), (G2, A2) = self.terms
        return G1 @ V @ A1 + G2 @ V @ A2 + self.damping * V

    def __call__(self, V: Tensor) -> Tensor:
        self._check_v(V)
        V = V.to(self.dtype)
        if self.kind == "kron2" and self.damping_mode == "exact":
            return self._pcg(V)
        return self._apply_structured(V)

    def _pcg(self, B: Tensor) -> Tensor:
        """Batched PCG (:func:`curvlib.solvers.cg`, one system per leading index) on
        ``G1 X A1 + G2 X A2 + λ X = B``, preconditioned by the structured inverse, which also
        gives the initial guess; relative tolerance per system, no absolute floor."""
        tol = self.tol if self.tol is not None else default_tol(B.dtype, 1e-12, 1e-6)
        shape = B.shape
        if self.blocks is not None:  # [*, B m, n] -> [*, B, m, n]: one system per block too
            B = B.reshape(*shape[:-2], self.blocks, -1, self.in_dim)
        try:
            X, info = cg(
                self._kron2_matvec, B, x0=self._apply_dense_or_diag(B), tol=tol, atol=0.0,
                maxiter=self.maxiter, M=self._apply_dense_or_diag, batch_dims=B.dim() - 2,
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
                stacklevel=3,
            )
        return X.reshape(shape)

    # ------------------------------------------------------------------ dense (tests / debugging)
    def damped_matrix(self) -> Tensor:
        """The dense matrix that ``P`` inverts (``[out*in, out*in]``, row-major vec); small sizes only."""
        lam = self.damping
        if self.kind == "bias":
            G = _dense(sum(t[0] for t in self.terms))
            return G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        n = self.out_dim * self.in_dim
        eye = torch.eye(n, dtype=self.dtype, device=self.terms[0][0].device)
        if self.kind == "kron1" and self.blocks is not None:
            G, A = self.terms[0] if self.damping_mode == "exact" else self._pi_factors
            if self.damping_mode == "exact":
                return torch.block_diag(*[torch.kron(g, a) for g, a in zip(G, A)]) + lam * eye
            s, pis = math.sqrt(lam), self.pi.tolist()
            return torch.block_diag(*[
                torch.kron(g + s / p * torch.eye(g.shape[0], dtype=g.dtype), a + s * p * torch.eye(a.shape[0], dtype=a.dtype))
                for g, a, p in zip(G, A, pis)
            ])
        if self.kind == "kron1":
            G, A = map(_dense, self.terms[0] if self.damping_mode == "exact" else self._pi_factors)
            if self.damping_mode == "exact":
                return torch.kron(G, A) + lam * eye
            s = math.sqrt(lam)
            return torch.kron(
                G + s / self.pi * torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
                A + s * self.pi * torch.eye(A.shape[0], dtype=A.dtype, device=A.device),
            )
        if self.blocks is not None:  # block form: the blocks' matrices on the diagonal
            return torch.block_diag(*[self._kron2_dense(b) for b in range(self.blocks)])
        return self._kron2_dense(None)

    def _kron2_dense(self, b: Optional[int]) -> Tensor:
        """The dense two-term matrix (of block ``b`` in the block form)."""
        at = (lambda F: F) if b is None else (lambda F: F[b])
        (G1, A1), (G2, A2) = [[at(F) for F in t] for t in self.terms]
        if self.damping_mode == "exact":
            eye = torch.eye(G1.shape[0] * A1.shape[0], dtype=self.dtype, device=G1.device)
            return torch.kron(G1, A1) + torch.kron(G2, A2) + self.damping * eye
        G1d, A1d = at(self._G1d), at(self._A1d)
        M = torch.kron(G1d, A1d) + torch.kron(G2, A2)
        if self._raise is not None:  # + kron(X, Y)^-T diag(raise) kron(X, Y)^-1, X^-T = G1d X
            B = torch.kron(G1d @ at(self._Qg), A1d @ at(self._Qa))
            M = M + (B * at(self._raise).reshape(-1)) @ B.T
        return M

    def __repr__(self) -> str:
        dims = f"out={self.out_dim}" + (f", in={self.in_dim}" if self.in_dim is not None else "")
        return (
            f"KroneckerInverse(kind={self.kind}, {dims}, terms={len(self.terms)}, "
            f"damping={self.damping:g}, damping_mode={self.damping_mode!r})"
        )


def kron_matvec(terms, V: Tensor) -> Tensor:
    """``sum_i kron(G_i, A_i) vec(V)`` as ``sum_i G_i V A_i`` (bias terms ``[G]``: ``sum_i G_i v``)
    for every factor form of :class:`KroneckerInverse`: dense ``[m, m]``, diagonal ``[m]`` and block
    ``[B, m, m]`` (``V [*, B m, n]`` viewed ``[*, B, m, n]``, ``v [*, B m]`` viewed ``[*, B, m]``).

    ``terms``: as :class:`KroneckerInverse` (one term may be passed unnested, e.g. ``p.kfac``);
    ``V``: ``[*, out, in]`` (bias: ``[*, out]``). Returns the undamped product, shaped like ``V``.
    """
    terms = _normalize_terms(terms)
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
            out = out + _right(_left(G, V), A)
    return out


# ---------------------------------------------------------------------- factor forms
def _eig(F: Tensor, name: str):
    """``(eigenvalues, eigenvectors)`` of a factor: ``(F, None)`` for a 1-D (diagonal) one
    (no matrix formed), batched ``safe_eigh`` for ``[B, m, m]``."""
    if F.dim() == 1:
        return F, None
    return safe_eigh(F, name)


def _damped_inverse(F: Tensor, c) -> Optional[Tensor]:
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


def _diag(F: Tensor) -> Tensor:
    return F if F.dim() == 1 else torch.diagonal(F, dim1=-2, dim2=-1)


def _dense(F: Tensor) -> Tensor:
    """The dense matrix of a factor (tests / :meth:`KroneckerInverse.damped_matrix`)."""
    if F.dim() == 3:
        return torch.block_diag(*F)
    return torch.diag(F) if F.dim() == 1 else F


def _inverse_from_eig(lam: Tensor, Q: Optional[Tensor]) -> Tensor:
    """``Q diag(1/lam) Q^T`` (``[..., m, m]``), or the 1-D ``1/lam`` for a diagonal factor."""
    if Q is None:
        return 1.0 / lam
    return (Q / lam[..., None, :]) @ Q.mT


def _left(M: Tensor, V: Tensor) -> Tensor:
    """``M V`` for a matrix or diagonal (1-D) ``M``."""
    return M[:, None] * V if M.dim() == 1 else M @ V


def _right(V: Tensor, M: Tensor) -> Tensor:
    """``V M`` for a matrix or diagonal (1-D) ``M``."""
    return V * M if M.dim() == 1 else V @ M
