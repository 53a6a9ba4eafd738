r"""The Van Loan rearrangement of a weight's exact curvature block, applied matrix-free.

For a weight viewed as a ``d0 x d1`` matrix (``d0 = p.shape[0]``) with per-sample gradients
``X_j`` (``j = (k, n)`` over the ``K N`` columns of the curvature source, see
:mod:`curvlib.engine.capture`), the exact block is ``F = sum_j vec(X_j) vec(X_j)^T``. Its
Van Loan rearrangement ``R(F)[(i,k),(a,b)] = F[(i,a),(k,b)]`` (``d0^2 x d1^2``) is
``sum_j X_j ⊗ X_j`` re-indexed, so it is applied without forming ``F``::

    R vec(V) = vec(sum_j X_j V X_j^T)        (V: d1 x d1 -> d0 x d0)
    R^T vec(U) = vec(sum_j X_j^T U X_j)      (U: d0 x d0 -> d1 x d1)

and the top-``r`` singular triplets ``(s_i, U_i, V_i)`` of ``R`` give the best Frobenius
approximation ``F ≈ sum_i s_i U_i ⊗ V_i`` (Van Loan & Pitsianis 1993, "Approximation with
Kronecker products"; Koroko et al. 2022, "Efficient approximations of the Fisher matrix in
neural networks using Kronecker product singular value decomposition"). With
``X_j = sum_t s_{j,t} a_{j,t}^T`` the sum over weight-sharing positions is inside ``X_j``, so
the approximation is of the *exact* block, cross-position terms included.

How the products are computed (per layer, :class:`RearrangedBlock`):

* **compression**: a side whose vectors span fewer dimensions than half its size (e.g. the
  784 inputs of an MNIST layer seen by 128 samples) is replaced by coordinates in an
  orthonormal basis of its span (thin QR). This is exact: ``U_i, V_i`` live in that span.
* **form** (the cheaper of two by a flop count, per product, ``M = K N``):
  ``"factored"``: ``sum_j S_j^T (A_j V A_j^T) S_j`` from the per-position vectors,
  ``N T da (da + T) + M T ds (ds + T)`` flops -- always chosen for ``T = 1`` (Linear), where it
  is two weighted Gram matrices, the cost of one set of KFAC factors;
  ``"grads"``: materialized per-sample gradients ``X [M, d0, d1]``, ``M d0 d1 (d0 + d1)``
  flops -- cheaper for convolutions with many positions.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.factors import Orientation, orientation
from curvlib.solvers.kronecker_svd import gram_svd_flops

FORMS = ("auto", "factored", "grads")



def _sandwich(x: Tensor, M: Optional[Tensor]) -> Tensor:
    """``x_b M x_b^T`` for ``x`` [B, T, d], ``M`` [d, d] (``None``: identity) -> [B, T, T]."""
    xm = x if M is None else x @ M
    if x.shape[1] == 1:
        return (xm * x).sum(-1, keepdim=True)
    return xm @ x.transpose(1, 2)


def _congruence(x: Tensor, W: Tensor) -> Tensor:
    """``sum_b x_b^T W_b x_b`` for ``x`` [..., B, T, d] and ``W`` [B, T, T] (broadcast) -> [d, d]."""
    Wx = W * x if x.shape[-2] == 1 else W @ x
    d = x.shape[-1]
    return x.reshape(-1, d).T @ Wx.reshape(-1, d)


def _compress(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Coordinates of the vectors ``x`` [..., d] in an orthonormal basis ``Q`` [d, r] of their span.

    Done (``r`` = number of vectors) only when ``2 r <= d``; otherwise returns ``(x, None)``.
    ``x = x_c Q^T`` exactly (thin QR of ``x^T``).
    """
    d = x.shape[-1]
    rows = x.numel() // d
    if rows == 0 or 2 * rows > d:
        return x, None
    Q, Rf = torch.linalg.qr(x.reshape(rows, d).T)
    return Rf.T.reshape(*x.shape[:-1], rows), Q


class RearrangedBlock:
    r"""Products with the Van Loan rearrangement ``R`` of one weight's exact curvature block.

    ``F = sum_{k,n} vec(X_kn) vec(X_kn)^T`` with ``X_kn = sum_t s_knt a_nt^T`` (``act_side="right"``,
    weight ``[D_s, D_a]``) or ``sum_t a_nt s_knt^T`` (``"left"``, weight ``[D_a, D_s]``). All products
    act in *working* coordinates (see :func:`_compress`): ``U`` is ``r0 x r0``, ``V`` is ``r1 x r1``;
    :meth:`expand` maps them back to ``d0 x d0`` / ``d1 x d1``.

    Args:
        a: activation vectors ``[N, T, D_a]``.
        s: cotangent vectors ``[K, N, T, D_s]``.
        act_side: ``"right"`` or ``"left"`` (which side of the weight ``a`` is on), or the
            :class:`~curvlib.engine.factors.Orientation`.
        form: ``"auto"`` (cheaper by flop count), ``"factored"`` or ``"grads"``.
        compress: compress a side to the span of its vectors when that halves it or better.
    """

    def __init__(self, a: Tensor, s: Tensor, act_side: str | Orientation = "right", form: str = "auto", compress: bool = True):
        if form not in FORMS:
            raise ValueError(f"curvlib: RearrangedBlock(form={form!r}) is not one of {FORMS}.")
        self.orientation = o = orientation(act_side)  # raises for a bad act_side
        self.act_side = o.act_side
        self.K, self.N, self.T = s.shape[0], s.shape[1], s.shape[2]
        Da, Ds = a.shape[-1], s.shape[-1]
        self.Qa: Optional[Tensor] = None
        self.Qs: Optional[Tensor] = None
        if compress:
            a, self.Qa = _compress(a)
            s, self.Qs = _compress(s)
        self.a, self.s = a, s
        da, ds = a.shape[-1], s.shape[-1]
        # d: full sizes, r: working sizes, ordered (first factor = p.shape[0], second)
        self.d = tuple(o.pair(Ds, Da))
        self.r = tuple(o.pair(ds, da))
        N, T, M = self.N, self.T, self.K * self.N
        self.flops = {
            "factored": N * T * da * (da + T) + M * T * ds * (ds + T),
            "grads": M * da * ds * (da + ds),
        }
        self.form = min(self.flops, key=self.flops.get) if form == "auto" else form
        self.X: Optional[Tensor] = None
        if self.form == "grads":
            self.X = rearrange(torch.einsum(o.outer_equation, s, a), "k n i j -> (k n) i j")

    @classmethod
    def from_capture(cls, capture: LayerCapture, source: Source, **kw: Any) -> "RearrangedBlock":
        """The rearranged block of ``capture``'s weight for curvature ``source``."""
        return cls(capture.act(), capture.cot(source), capture.orientation, **kw)

    @property
    def shape(self) -> Tuple[int, int]:
        """``(r0^2, r1^2)``: the size of ``R`` in working coordinates."""
        return self.r[0] ** 2, self.r[1] ** 2

    def _product(self, M: Optional[Tensor], side: str) -> Tensor:
        """``sum_j X_j M X_j^T``-type product of a matrix ``M`` over ``side`` (``"act"``/``"cot"``)."""
        if side == "act":  # sandwich per sample n, congruence over all (k, n)
            return _congruence(self.s, _sandwich(self.a, M))
        W = _sandwich(rearrange(self.s, "k n t d -> (k n) t d"), M)
        return _congruence(self.a, rearrange(W, "(k n) t u -> k n t u", k=self.K).sum(0))

    def matvec(self, v: Tensor) -> Tensor:
        """``R v``: flat ``V`` [r1^2] -> flat ``sum_j X_j V X_j^T`` [r0^2]."""
        V = v.reshape(self.r[1], self.r[1])
        if self.X is not None:
            return torch.einsum("jac,jdc->ad", self.X @ V, self.X).reshape(-1)
        return self._product(V, self.orientation.side(1)).reshape(-1)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``R^T u``: flat ``U`` [r0^2] -> flat ``sum_j X_j^T U X_j`` [r1^2]."""
        U = u.reshape(self.r[0], self.r[0])
        if self.X is not None:
            return torch.einsum("jab,jad->bd", self.X, U @ self.X).reshape(-1)
        return self._product(U, self.orientation.side(0)).reshape(-1)

    def rmatvec_identity(self) -> Tensor:
        """``R^T vec(I) = sum_j X_j^T X_j`` (flat [r1^2]), cheaper than a general product: the
        cold start of the power iteration (one power step from ``U = I``)."""
        if self.X is not None:
            return torch.einsum("jab,jad->bd", self.X, self.X).reshape(-1)
        return self._product(None, self.orientation.side(0)).reshape(-1)

    def columns(self) -> Tuple[Tensor, Tensor]:
        """``(x0 [M, T, r0], x1 [M, T, r1])``, ``M = K N``: the per-position vectors of each
        factor's side (working coordinates) with ``X_j = sum_t x0_jt x1_jt^T`` -- the input of
        :func:`~curvlib.solvers.kronecker_svd.kronecker_svd_gram`."""
        s = rearrange(self.s, "k n t d -> (k n) t d")
        a = self.a.unsqueeze(0).expand(self.K, *self.a.shape)
        a = rearrange(a, "k n t d -> (k n) t d")
        x0, x1 = self.orientation.pair(s, a)
        return x0, x1

    def gram_flops(self, rank: int) -> float:
        """Estimated multiply-adds of the exact Gram route (:func:`gram_svd_flops`)."""
        return gram_svd_flops(self.K * self.N, self.T, self.r[0], self.r[1], rank)

    def _basis(self, i: int) -> Optional[Tensor]:
        return self.Qs if self.orientation.side(i) == "cot" else self.Qa

    def expand(self, M: Tensor, i: int) -> Tensor:
        """Working ``[..., r_i, r_i]`` -> full ``[..., d_i, d_i]`` coordinates (``Q M Q^T``)."""
        Q = self._basis(i)
        return M if Q is None else Q @ M @ Q.T

    def project(self, M: Tensor, i: int) -> Tensor:
        """Full ``[..., d_i, d_i]`` -> working coordinates (``Q^T M Q``)."""
        Q = self._basis(i)
        return M if Q is None else Q.T @ M @ Q


def full_coordinates(x: Tuple[Tensor, Optional[Tensor]]) -> Tensor:
    """Full coordinates of ``(coordinates, basis)`` vectors (``x = x_c Q^T``, :func:`_compress`)."""
    xc, Q = x
    return xc if Q is None else xc @ Q.T


__all__ = ["RearrangedBlock", "FORMS", "full_coordinates"]
