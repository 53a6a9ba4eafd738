r"""KPSVD: best rank-``r`` Kronecker approximation of each exact curvature block.

``p.kpsvd = [[G_1, A_1], ..., [G_r, A_r]]``: the top-``r`` singular triplets of the Van Loan
rearrangement of the weight's exact block (:mod:`curvlib.extensions.rearranged`: the math, and
how its products are computed without forming the block), found by
:class:`~curvlib.extensions.kronecker_svd_base.KroneckerSVDExtension` (the exact Gram route or
power / Lanczos iterations, warm starts, and the convention of the returned terms). Van Loan &
Pitsianis 1993, "Approximation with Kronecker products"; Koroko et al. 2022, "Efficient
approximations of the Fisher matrix in neural networks using Kronecker product singular value
decomposition".
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional

from torch import Tensor

from curvlib.engine.capture import LayerCapture
from curvlib.extensions.kronecker_svd_base import KroneckerSVDExtension
from curvlib.extensions.rearranged import RearrangedBlock
from curvlib.solvers.kronecker_svd import kronecker_svd

class KPSVD(KroneckerSVDExtension):
    r"""Best rank-``rank`` Kronecker approximation of every exact curvature block.

    ``p.kpsvd = [[G_1, A_1], ..., [G_r, A_r]]`` per weight, with ``sum_i kron(G_i, A_i)`` the best
    Frobenius approximation of the block of ``p.flatten()`` by a sum of ``rank`` Kronecker
    products (conventions: :mod:`~curvlib.extensions.kronecker_svd_base`); ``[[G]]`` per bias, the exact bias block.
    Terms come in decreasing order of singular value; the first is positive semi-definite, later
    ones are in general indefinite.

    Shapes, as for :class:`KFAC`: ``G_i`` ``[out, out]``, ``A_i`` ``[in * prod(kernel), ...]``
    for a weight ``[out, in, *kernel]`` (the first factor is over ``p.shape[0]`` for every layer,
    so transposed convolutions get ``[in, in]`` first); the bias block ``G`` is ``[out, out]``.
    Grouped / depthwise convolutions (``B`` groups) get the block form of docs/design.md §2,
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

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1, rank: int = 1, *solver: Any, **solver_kw: Any):
        # solver options (method, maxiter, tol, warm_start, algorithm): KroneckerSVDExtension's
        super().__init__(fisher_type, mc_samples, *solver, **solver_kw)
        if int(rank) < 1:
            raise ValueError(f"curvlib: KPSVD(rank={rank}) must be >= 1.")
        self.rank = int(rank)
        self._clamped: set = set()  # weight shapes whose rank clamp was announced

    def grouped_weight_terms(self, p: Tensor, capture: LayerCapture) -> List[List[Tensor]]:
        return self._grouped_terms(p, capture, self.rank)

    def tied_weight_terms(self, p: Tensor, name: str, capture: LayerCapture) -> List[List[Tensor]]:
        """A parameter used by several layers (weight tying): the best rank-``rank`` Kronecker
        approximation of its exact block, from the per-sample gradients summed over the uses
        (the grouped route with one group)."""
        return [[g[0], a[0]] for g, a in self._grouped_terms(p, capture, self.rank, name=name)]

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


#: (RearrangedBlock, KroneckerSVDExtension and kronecker_svd lived here before the split: importable as before)
__all__ = ["KPSVD", "RearrangedBlock", "kronecker_svd", "KroneckerSVDExtension"]
