r"""The shared machinery of the Kronecker-SVD extensions (:class:`~curvlib.extensions.kpsvd.KPSVD`,
:class:`~curvlib.extensions.kfac_corrected.KFACCorrected`): the top singular triplets of each
weight's rearranged block (:mod:`curvlib.extensions.rearranged`), solver dispatch, warm starts,
the block form of grouped layers, joining the backwards of one context, and the convention of
the returned terms.

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
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import MAX_FACTOR_DIM, gram
from curvlib.extensions.base import Extension
from curvlib.extensions.factor_dims import FactorDims
from curvlib.extensions.rearranged import RearrangedBlock, full_coordinates
from curvlib.solvers.kronecker_svd import METHODS, kronecker_svd, kronecker_svd_gram, signed_terms

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


class KroneckerSVDExtension(FactorDims, Extension):
    """Shared machinery of ``KPSVD`` and ``KFACCorrected``: rearranged products, solver
    dispatch, warm starts and term conventions. Subclasses implement :meth:`weight_terms` and
    :meth:`grouped_weight_terms`.

    The options every Kronecker-SVD extension takes are declared here once: a subclass's
    ``__init__`` takes ``fisher_type, mc_samples`` and its own option, and passes the rest on in
    this order, ``method, maxiter, tol, warm_start, algorithm`` (positional or by name).

    Args:
        fisher_type, mc_samples: the curvature source (:class:`~curvlib.extensions.base.Extension`).
        method: the iterative solver (``METHODS``: ``"power"``, ``"deflation"``, ``"lanczos"``);
            ``None``: the subclass's :attr:`default_method`.
        maxiter, tol: the solver's iteration limit and tolerance (``None``: its defaults).
        warm_start: start each call from the previous call's first factors (iterative route).
        algorithm: ``"gram"``, ``"iterative"`` or ``"auto"`` (:data:`ALGORITHMS`, module docstring).
        max_factor_dim: (keyword) a layer with a factor side above it is refused with an error
            naming it (the terms have no diagonal form; :class:`KFAC` and :class:`EKFAC` keep such
            a side diagonal); ``None``: no limit. Default
            :data:`~curvlib.engine.factors.MAX_FACTOR_DIM`.
    """

    exact_type2 = True
    #: several backwards in one context: the terms of the combined block (compute() joins the
    #: captures of the earlier backwards, which are kept until the next context)
    accumulation = "custom"
    #: the ``method`` when none is given
    default_method: ClassVar[str] = "power"

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        method: Optional[str] = None,
        maxiter: Optional[int] = None,
        tol: Optional[float] = None,
        warm_start: bool = True,
        algorithm: str = "auto",
        *,
        max_factor_dim: Optional[int] = MAX_FACTOR_DIM,
    ):
        super().__init__(fisher_type, mc_samples)
        self._init_factor_dims(max_factor_dim)
        method = self.default_method if method is None else method
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
                    a = torch.cat([full_coordinates(pa), a], dim=0)
                    s = torch.cat([full_coordinates(ps), s], dim=1)
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
        self, p: Tensor, capture: LayerCapture, rank: int, correction: Optional[Tuple[Tensor, Tensor]] = None,
        name: str = "weight",
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
        B = capture.structure(name).blocks
        X = capture.per_sample_grads(name, self.source)
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

    def tied_weight_terms(self, p: Tensor, name: str, capture: LayerCapture) -> List[List[Tensor]]:
        """The terms of a parameter used by several layers (weight tying, ``capture.uses``); by
        default refused, naming the parameter."""
        raise NotImplementedError(
            f"curvlib: {type(self).__name__} does not support {capture.module}, which is used by "
            f"{len(capture.uses)} layers (weight tying). Use KFAC (the sum of the uses' Kronecker "
            "terms, inverted exactly by KroneckerInverse), KPSVD (the best Kronecker approximation "
            "of the tied parameter's exact block) or the exact extensions (ExactBlockFisher, "
            "DiagGGN, GGNMP)."
        )

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        self.refuse_large_factors(
            capture, "its Kronecker-SVD terms have no diagonal form",
            "Use KFAC or EKFAC for it (they keep that side diagonal), or leave it out of this extension. ",
        )
        out: Dict[str, Any] = {}
        params, bias_block, block = capture.params, None, None
        for name in params:  # a NaN / Inf input is the engine's FloatingPointError, not a solver's error
            capture.finite_inputs(name, self.source)
        if capture.uses is not None:  # a tied parameter (engine.tying): from per-sample gradients
            ((name, p),) = params.items()
            if capture.summed(name):
                return self._summed_blocks(capture)
            return {name: self.tied_weight_terms(p, name, capture)}
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


__all__ = ["KroneckerSVDExtension", "ALGORITHMS", "EXPECTED_PRODUCTS", "GRAM_MAX_COLUMNS"]
