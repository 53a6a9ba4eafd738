r"""KPSVD: best rank-``r`` Kronecker approximation of each exact curvature block.

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

Exact route (``algorithm="gram"``, or ``"auto"`` when cheaper): with ``X_j = sum_t x0_jt x1_jt^T``
(``x0``/``x1`` the per-position vectors of the first/second factor's side),
``R = sum_{j,t,t'} vec(x0_jt x0_jt'^T) vec(x1_jt x1_jt'^T)^T`` has ``P = K N T^2`` columns, and its
top triplets follow exactly from the two ``P x P`` Grams (elementwise squares of the vectors'
Gram matrices for ``T = 1``) -- :func:`~curvlib.solvers.kronecker_svd.kronecker_svd_gram`: two
float64 eigendecompositions and ``rank`` weighted Grams per side, no iteration count that grows
when singular values are close. For ``T = 1`` Linear layers ``P`` is the batch size (times
``mc_samples``); on the paper's autoencoder at batch 512 it makes a rank-2 update of a
1000 x 784 layer 3-5x cheaper than Lanczos and 4-30x cheaper than deflation. ``"auto"`` compares
:func:`~curvlib.solvers.kronecker_svd.gram_svd_flops` with :data:`EXPECTED_PRODUCTS` products of
the iterative route, and never takes the Gram route above :data:`GRAM_MAX_COLUMNS` columns
(convolutions with many positions).

Starts (iterative route): one power step ``R^T vec(U)`` from a left guess ``U``: with ``warm_start``, the previous
call's first factors; on a cold start the exact bias block when the layer has a bias on that side
(Linear, Conv: it is KFAC's ``G`` for ``T = 1``), else the identity (cheaper than a product). For
``rank=1`` power iteration then typically converges in 1-2 iterations (3-5 products, each about the
cost of one set of KFAC factors).

Convention of the returned terms (``p.kpsvd = [[G_1, A_1], [G_2, A_2], ...]``, decreasing
``s_i``): ``G_i = sqrt(s_i) U_i``, ``A_i = sqrt(s_i) V_i`` (equal Frobenius norms); the joint sign
of ``(U_i, V_i)`` makes the trace of the factor with the larger ``|trace| / ||.||_F`` positive --
for the leading term of a positive semi-definite block both factors are then PSD. The first
factor is over ``p.shape[0]`` for every layer (for transposed convolutions that is the input
side, as in ``p.kfac``), so ``sum_i kron(G_i, A_i)`` approximates the block of ``p.flatten()``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.factors import Orientation, gram, orientation
from curvlib.extensions.base import Extension
from curvlib.solvers.kronecker_svd import METHODS, gram_svd_flops, kronecker_svd, kronecker_svd_gram, signed_terms

FORMS = ("auto", "factored", "grads")
#: how the singular triplets are found: ``"gram"`` (exact, from the ``M T^2``-column Grams,
#: :func:`~curvlib.solvers.kronecker_svd.kronecker_svd_gram`), ``"iterative"`` (power / Lanczos on
#: the products of :class:`RearrangedBlock`) or ``"auto"`` (the cheaper by a flop estimate)
ALGORITHMS = ("auto", "gram", "iterative")
#: products per Kronecker term that ``"auto"`` expects of the iterative route (rank 1: power
#: iteration). Measured on the MLP autoencoder of ``examples/exp_autoencoder.py`` (batch 512,
#: warm-started, 70 natural-gradient steps): power 4-10 for rank 1; rank 2: Lanczos 14-28,
#: deflation 12-314 (median ~40) products per update
EXPECTED_PRODUCTS = {"power": 6, "deflation": 25, "lanczos": 9}
#: the Gram route is never chosen automatically above this many columns ``K N T^2`` (its
#: ``P x P`` float64 Grams: 128 MB at 4096)
GRAM_MAX_COLUMNS = 4096


# ---------------------------------------------------------------- products


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


def _full(x: Tuple[Tensor, Optional[Tensor]]) -> Tensor:
    """Full coordinates of ``(coordinates, basis)`` vectors (``x = x_c Q^T``)."""
    xc, Q = x
    return xc if Q is None else xc @ Q.T


def _minus_outer(
    mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], c0: Tensor, c1: Tensor
) -> Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The products of ``R - c0 c1^T`` (and its transpose) from those of ``R``, matrix-free
    (KFACCorrected's residual, ``c0 = vec(G)``, ``c1 = vec(A)``)."""
    return (lambda v: mv(v) - c0 * (c1 @ v)), (lambda u: rmv(u) - c1 * (c0 @ u))


class _Counted:
    """Wraps a product and counts its calls."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x)


class KroneckerSVDExtension(Extension):
    """Shared machinery of :class:`KPSVD` and ``KFACCorrected``: rearranged products, solver
    dispatch, warm starts and term conventions. Subclasses implement :meth:`weight_terms`."""

    exact_type2 = True
    #: several backwards in one context: the terms of the combined block (compute() joins the
    #: captures of the earlier backwards, which are kept until the next context)
    accumulation = "custom"

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        method: str = "power",
        maxiter: Optional[int] = None,
        tol: Optional[float] = None,
        warm_start: bool = True,
        algorithm: str = "auto",
    ):
        super().__init__(fisher_type, mc_samples)
        if method not in METHODS:
            raise ValueError(f"curvlib: {type(self).__name__}(method={method!r}) is not one of {METHODS}.")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"curvlib: {type(self).__name__}(algorithm={algorithm!r}) is not one of {ALGORITHMS}.")
        self.method, self.maxiter, self.tol, self.warm_start = method, maxiter, tol, bool(warm_start)
        self.algorithm = algorithm
        #: id(param) -> "gram" or "iterative": the route the last call took
        self.routes: Dict[int, str] = {}
        #: param -> last first factors ``[rank, d0, d0]`` (left singular vectors times sqrt(s));
        #: weak: an entry goes with its parameter and never aliases a new one with a recycled id
        self._warm: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: id(param) -> number of products with ``R`` or ``R^T`` in the last call
        self.products: Dict[int, int] = {}
        #: layer -> (backward, a, s, bias vectors) of this context, full coordinates
        #: (compressed sides as (coordinates, basis)): to join later backwards to
        self._joined: Dict[nn.Module, Tuple[int, Any, Any, Optional[Tensor]]] = {}

    def begin(self) -> None:
        self._joined = {}

    def finish(self) -> None:
        self._joined = {}

    def accumulate(self, capture, name, old, new, counts):
        """``new`` already is the result of the joined captures (see :meth:`compute`)."""
        return new

    def _join(self, capture: LayerCapture, a: Optional[Tensor], s: Optional[Tensor], xb: Optional[Tensor]):
        """Concatenate this backward's samples with those of the earlier backwards of the
        context (the block of the concatenated batch is the sum of the blocks)."""
        prev = self._joined.get(capture.module)
        if prev is not None and prev[0] < capture.backward:
            _, pa, ps, pxb = prev
            try:
                if a is not None:
                    a = torch.cat([_full(pa), a], dim=0)
                    s = torch.cat([_full(ps), s], dim=1)
                if xb is not None:
                    xb = torch.cat([pxb, xb], dim=1)
            except RuntimeError as e:
                raise ValueError(
                    f"curvlib: {type(self).__name__} accumulates the backwards of one curvature "
                    f"context on {capture.module} by joining their samples, which needs the same "
                    f"positions and columns per sample in every backward ({e})."
                ) from None
        return a, s, xb

    def _keep(self, capture: LayerCapture, block: Optional["RearrangedBlock"], xb: Optional[Tensor]) -> None:
        a = s = None
        if block is not None:
            a, s = (block.a, block.Qa), (block.s, block.Qs)
        self._joined[capture.module] = (capture.backward, a, s, xb)

    def _svd(
        self,
        p: Tensor,
        block: RearrangedBlock,
        rank: int,
        correction: Optional[Tuple[Tensor, Tensor]] = None,
        guess: Optional[Tensor] = None,
    ) -> List[List[Tensor]]:
        """``[[G_i, A_i]]`` (full coordinates) from the top-``rank`` triplets of ``R`` (minus
        ``vec(C0) vec(C1)^T`` for ``correction = (C0, C1)`` in working coordinates). ``guess``:
        a left guess ``[d0, d0]`` for a cold start (instead of the identity)."""
        if self._route(block, rank) == "gram":
            x0, x1 = block.columns()
            U, S, V = kronecker_svd_gram(x0, x1, rank, correction)
            self.products[id(p)], self.routes[id(p)] = 0, "gram"
            return self._terms(p, block, U, S, V)
        self.routes[id(p)] = "iterative"
        mv, rmv = block.matvec, block.rmatvec
        if correction is not None:
            c0, c1 = correction[0].reshape(-1), correction[1].reshape(-1)
            mv, rmv = _minus_outer(mv, rmv, c0, c1)
        mv, rmv = _Counted(mv), _Counted(rmv)
        # start: one power step R^T vec(U) from a left guess U -- the previous left factors (warm),
        # `guess`, or the identity (cold, cheaper than a product). A power step from the previous
        # *left* factors beats the previous *right* ones: those lie partly outside the span of the
        # new batch's activations.
        prev = self._warm.get(p) if self.warm_start else None
        if prev is not None and prev.shape[1] == block.d[0] and (prev.dtype, prev.device) == (p.dtype, p.device):
            v0 = torch.stack([rmv(Ui.reshape(-1)) for Ui in block.project(prev, 0)], 1)
        elif guess is not None:
            v0 = rmv(block.project(guess, 0).reshape(-1))[:, None]
        else:
            v0 = block.rmatvec_identity()
            if correction is not None:
                v0 = v0 - c1 * torch.trace(correction[0])
            v0 = v0[:, None]
            rmv.calls += 1
        U, S, V = kronecker_svd(mv, rmv, block.r, rank, p, self.method, v0, self.maxiter, self.tol)
        self.products[id(p)] = mv.calls + rmv.calls
        return self._terms(p, block, U, S, V)

    def _route(self, block: RearrangedBlock, rank: int) -> str:
        """``"gram"`` (exact, :func:`kronecker_svd_gram`) or ``"iterative"``: ``algorithm``, or for
        ``"auto"`` the cheaper by the flop estimates -- the Gram route's against
        :data:`EXPECTED_PRODUCTS` products of the iterative one, and never above
        :data:`GRAM_MAX_COLUMNS` columns (many positions ``T``: convolutions stay iterative)."""
        if self.algorithm != "auto":
            return self.algorithm
        if block.K * block.N * block.T**2 > GRAM_MAX_COLUMNS:
            return "iterative"
        kind = "lanczos" if self.method == "lanczos" else ("power" if rank == 1 else "deflation")
        products = EXPECTED_PRODUCTS[kind] * rank
        return "gram" if block.gram_flops(rank) < products * block.flops[block.form] else "iterative"

    def _terms(self, p: Tensor, block: RearrangedBlock, U: Tensor, S: Tensor, V: Tensor) -> List[List[Tensor]]:
        """``[[G_i, A_i]]`` in full coordinates from working-coordinate triplets (and the warm start)."""
        root = S.clamp_min(0).sqrt()[:, None, None]
        G, A = block.expand(U * root, 0), block.expand(V * root, 1)
        if self.warm_start:  # unnormalized is fine: only the direction is used
            self._warm[p] = G.detach()
        return [[g, a] for g, a in zip(G, A)]

    def warm_factors(self, p: Tensor) -> Optional[Tensor]:
        """The first factors ``[rank, d0, d0]`` the next call starts from for ``p`` (``None``: cold)."""
        return self._warm.get(p)

    def set_warm_factors(self, p: Tensor, G: Optional[Tensor]) -> None:
        """Set (``None``: clear) ``p``'s warm start, e.g. from an optimizer checkpoint."""
        if G is None:
            self._warm.pop(p, None)
        else:
            self._warm[p] = G

    def _summed_blocks(self, capture: LayerCapture) -> Dict[str, Any]:
        """``[[C_p]]`` with ``C_p`` the exact block of each parameter of a layer without an
        activation side (norm layers): its best Kronecker approximation is itself. The
        per-sample gradients of all its parameters are joined over backwards as a bias's."""
        params = capture.params
        xs = [capture.per_sample_grads(n, self.source).flatten(2) for n in params]
        _, _, x = self._join(capture, None, None, torch.cat(xs, dim=-1))
        self._keep(capture, None, x)
        F = gram(x.reshape(-1, x.shape[-1]))
        out, i = {}, 0
        for name, p in params.items():
            out[name] = [[F[i : i + p.numel(), i : i + p.numel()].clone()]]
            i += p.numel()
        return out

    def weight_terms(
        self, p: Tensor, capture: LayerCapture, block: RearrangedBlock, bias_block: Optional[Tensor]
    ) -> List[List[Tensor]]:
        """The weight's terms; ``bias_block``: the exact bias block (``None`` without a bias)."""
        raise NotImplementedError

    #: whether grouped layers get terms in the block form (:meth:`_grouped_terms`)
    block_form: bool = False
    #: grouped layers: groups whose rearranged blocks hold at most this many entries in all
    #: are decomposed densely (one batched SVD), larger ones group by group with the solver
    dense_entries: int = 1 << 22

    def grouped_weight_terms(self, p: Tensor, capture: LayerCapture) -> List[List[Tensor]]:
        """The weight's terms in the block form of a grouped layer (:meth:`_grouped_terms`)."""
        raise NotImplementedError

    def _grouped_terms(
        self, p: Tensor, capture: LayerCapture, rank: int, correction: Optional[Tuple[Tensor, Tensor]] = None
    ) -> List[List[Tensor]]:
        r"""Block form of a grouped layer (``B`` groups, weight rows of group ``b`` = block ``b``
        of ``p.shape[0]``): ``[[G_i [B, m, m], A_i [B, n, n]], ...]`` with, per group, the top
        ``rank`` Kronecker terms of the *diagonal* block of group ``b`` in the exact block
        (``m = p.shape[0] / B``, ``n = p[0].numel()``), as KFAC's block form drops the
        cross-group blocks; with ``correction = (C0 [B, m, m], C1 [B, n, n])``, of that block
        minus ``kron(C0[b], C1[b])``. From the per-sample gradients ``X [M, B, m, n]``: the
        rearranged ``R_b = sum_j X_jb ⊗ X_jb`` (re-indexed ``[m^2, n^2]``, minus
        ``vec(C0[b]) vec(C1[b])^T``) by one batched SVD when small (depthwise convolutions), else
        :func:`kronecker_svd` on its products per group."""
        B = capture.structure().blocks
        X = capture.per_sample_grads("weight", self.source)
        X = X.reshape(-1, B, p.shape[0] // B, p[0].numel())  # [M, B, m, n]
        key = (capture.module, "grouped")
        prev = self._joined.get(key)
        if prev is not None and prev[0] < capture.backward:
            X = torch.cat([prev[1], X])
        self._joined[key] = (capture.backward, X)
        M, _, m, n = X.shape
        most = min(m * m, n * n)
        if rank > most and (m, n) not in self._clamped:
            self._clamped.add((m, n))
            warnings.warn(
                f"curvlib: {type(self).__name__}(rank={rank}) exceeds the {most} Kronecker terms that "
                f"represent the {m}x{n} group blocks of {capture.module} exactly; it gets {most} terms (exact).",
                stacklevel=3,
            )
        rank = min(rank, most)
        c0 = c1 = None
        if correction is not None:
            c0, c1 = correction[0].reshape(B, -1), correction[1].reshape(B, -1)  # [B, m^2], [B, n^2]
        if B * m * m * n * n <= self.dense_entries:
            R = rearrange(torch.einsum("jbia,jbkc->bikac", X, X), "b i k a c -> b (i k) (a c)")
            if c0 is not None:
                R = R - c0[:, :, None] * c1[:, None, :]
            U, S, Vh = torch.linalg.svd(R, full_matrices=False)
            U = rearrange(U[..., :rank], "b (i k) r -> r b i k", i=m)
            V = rearrange(Vh[:, :rank], "b r (a c) -> r b a c", a=n)
            U, S, V = signed_terms(U, S[:, :rank].T, V, rank)  # signed as kronecker_svd's; S [rank, B]
        else:
            terms = []
            for b in range(B):  # large blocks: few groups
                Xb = X[:, b]
                mv = lambda v, Xb=Xb: torch.einsum("jac,jdc->ad", Xb @ v.reshape(n, n), Xb).reshape(-1)  # noqa: E731
                rmv = lambda u, Xb=Xb: torch.einsum("jab,jad->bd", Xb, u.reshape(m, m) @ Xb).reshape(-1)  # noqa: E731
                if c0 is not None:  # the residual R_b - vec(C0_b) vec(C1_b)^T, matrix-free
                    mv, rmv = _minus_outer(mv, rmv, c0[b], c1[b])
                terms.append(kronecker_svd(mv, rmv, (m, n), rank, X, self.method, None, self.maxiter, self.tol))
            U, S, V = (torch.stack(t, 1) for t in zip(*terms))  # [rank, B, ...], S [rank, B]
        root = S.clamp_min(0).sqrt()[..., None, None]
        return [[g, a] for g, a in zip(U * root, V * root)]

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        params, bias_block, block = capture.params, None, None
        if capture.has_summed_params:  # norm layers: exact blocks, one term each
            return self._summed_blocks(capture)
        grouped = "weight" in params and capture.structure().grouped
        if grouped and not self.block_form:
            raise NotImplementedError(
                f"curvlib: {type(self).__name__} does not support the grouped {capture.module} "
                "yet (KPSVD gives it the block form over the groups); use KPSVD, KFAC (block "
                "form) or ExactBlockFisher for it."
            )
        xb = capture.per_sample_grads("bias", self.source) if "bias" in params else None
        a = s = None
        if grouped:
            out["weight"] = self.grouped_weight_terms(params["weight"], capture)
        elif "weight" in params:
            a, s = capture.act(), capture.cot(self.source)
        a, s, xb = self._join(capture, a, s, xb)
        if xb is not None:  # exact block: a single term
            bias_block = gram(xb.reshape(-1, xb.shape[-1]))
        if a is not None:
            block = RearrangedBlock(a, s, capture.orientation)
            out["weight"] = self.weight_terms(params["weight"], capture, block, bias_block)
        if bias_block is not None:
            out["bias"] = [[bias_block]]
        self._keep(capture, block, xb)
        return out


class KPSVD(KroneckerSVDExtension):
    r"""Best rank-``rank`` Kronecker approximation of every exact curvature block.

    ``p.kpsvd = [[G_1, A_1], ..., [G_r, A_r]]`` per weight, with ``sum_i kron(G_i, A_i)`` the best
    Frobenius approximation of the block of ``p.flatten()`` by a sum of ``rank`` Kronecker
    products (module docstring for conventions); ``[[G]]`` per bias, the exact bias block.
    Terms come in decreasing order of singular value; the first is positive semi-definite, later
    ones are in general indefinite.

    Shapes, as for :class:`KFAC`: ``G_i`` ``[out, out]``, ``A_i`` ``[in * prod(kernel), ...]``
    for a weight ``[out, in, *kernel]`` (the first factor is over ``p.shape[0]`` for every layer,
    so transposed convolutions get ``[in, in]`` first); the bias block ``G`` is ``[out, out]``.
    Grouped / depthwise convolutions (``B`` groups) get the block form of DESIGN.md §2,
    ``[[G_i [B, m, m], A_i [B, n, n]], ...]``: per group, the terms of its diagonal block.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.
    For ``fisher_type="type-2"`` the approximated block is the exact GGN block (on Linear layers
    the rank-1 term equals KFAC only if the block happens to be a Kronecker product).

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN), ``"mc"`` or ``"empirical"``.
        mc_samples: sampled targets per datum for ``"mc"``.
        rank: number of Kronecker terms. A weight of shape ``[d0, d1]`` (flattened) has at most
            ``min(d0^2, d1^2)`` terms, and that many represent its block exactly: a larger ``rank``
            is clamped to it for that layer (warned once per layer shape), which is exact.
        method: ``"power"`` or ``"deflation"`` (the same routine: power iteration, later terms on
            the deflated rearrangement) or ``"lanczos"`` (Golub–Kahan–Lanczos bidiagonalization).
            Power iteration is cheapest for ``rank=1`` (the leading term is well separated: 3-5
            products); for ``rank >= 2`` prefer ``"lanczos"`` -- the later singular values are
            often clustered, where power iteration needs many more products.
        maxiter: iteration limit of the solver (power: per term, default 200; lanczos: products).
        tol: solver tolerance (default: the solver's, ``sqrt(eps)`` for power iteration).
        warm_start: start each call with one power step from the previous call's first factors
            (per parameter); otherwise (and on the first call) from the bias block or the identity.
            (Iterative route only.)
        algorithm: ``"gram"``: the triplets exactly, from the Gram matrices of the per-position
            vectors (:func:`~curvlib.solvers.kronecker_svd.kronecker_svd_gram`: two ``P x P``
            eigendecompositions, ``P = mc_samples N T^2`` columns, no iterations -- for ``T = 1``
            (Linear) ``P`` is the batch size); ``"iterative"``: ``method`` on the rearranged
            products; ``"auto"`` (default): the cheaper by a flop estimate (the Gram route for
            wide Linear layers when ``N`` is not much larger than the widths, rank 2 especially;
            the iterative route for convolutions with many positions).

    After a backward, :attr:`products` maps ``id(param)`` to the number of operator products used
    (0 on the Gram route) and :attr:`routes` to the route taken (``"gram"`` / ``"iterative"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import KPSVD
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> from curvlib.solvers import KroneckerInverse
        >>> with curvature(KPSVD(fisher_type="type-2", rank=2, method="lanczos")):
        ...     loss_fn(model(x), y).backward()
        >>> W = model[0].weight                  # [3, 4]
        >>> [(G.shape, A.shape) for G, A in W.kpsvd]
        [(torch.Size([3, 3]), torch.Size([4, 4])), (torch.Size([3, 3]), torch.Size([4, 4]))]
        >>> [[G.shape for G in t] for t in model[0].bias.kpsvd]
        [[torch.Size([3, 3])]]
        >>> KroneckerInverse(W.kpsvd, damping=1.0)(W.grad).shape
        torch.Size([3, 4])
    """

    savefield = "kpsvd"
    block_form = True

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        rank: int = 1,
        method: str = "power",
        maxiter: Optional[int] = None,
        tol: Optional[float] = None,
        warm_start: bool = True,
        algorithm: str = "auto",
    ):
        super().__init__(fisher_type, mc_samples, method, maxiter, tol, warm_start, algorithm)
        if int(rank) < 1:
            raise ValueError(f"curvlib: KPSVD(rank={rank}) must be >= 1.")
        self.rank = int(rank)
        self._clamped: set = set()  # weight shapes whose rank clamp was announced

    def grouped_weight_terms(self, p: Tensor, capture: LayerCapture) -> List[List[Tensor]]:
        return self._grouped_terms(p, capture, self.rank)

    def weight_terms(
        self, p: Tensor, capture: LayerCapture, block: RearrangedBlock, bias_block: Optional[Tensor]
    ) -> List[List[Tensor]]:
        # For Linear/Conv the bias block sum_j (sum_t s_jt)(sum_t s_jt)^T is over the first factor's
        # side and is KFAC's G for T = 1: a left guess close to the leading left factor (with it,
        # power iteration typically converges in its first iteration).
        guess = capture.orientation.pair(bias_block, None)[0]  # only when it is over the first factor
        most = min(block.d[0] ** 2, block.d[1] ** 2)
        if self.rank > most and block.d not in self._clamped:
            self._clamped.add(block.d)
            warnings.warn(
                f"curvlib: KPSVD(rank={self.rank}) exceeds the {most} Kronecker terms that "
                f"represent the {block.d[0]}x{block.d[1]} weight block of {capture.module} "
                f"exactly; it gets {most} terms (exact).",
                stacklevel=2,
            )
        return self._svd(p, block, min(self.rank, most), guess=guess)

    def __repr__(self) -> str:
        return (
            f"KPSVD(fisher_type={self.fisher_type!r}, mc_samples={self.mc_samples}, rank={self.rank}, "
            f"method={self.method!r}, algorithm={self.algorithm!r})"
        )


__all__ = ["KPSVD", "RearrangedBlock", "kronecker_svd", "KroneckerSVDExtension"]
