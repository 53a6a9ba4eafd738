r"""KFAC corrected: the KFAC term plus the best Kronecker approximation of its residual.

For a weight's exact curvature block ``F`` with Van Loan rearrangement ``R(F)`` (see
:mod:`curvlib.extensions.rearranged`) and KFAC factors ``(G, A)``::

    F ≈ G ⊗ A + S ⊗ R,     s vec(S0) vec(R0)^T = top singular triplet of R(F) - vec(G) vec(A)^T

(Koroko et al. 2022, "Efficient approximations of the Fisher matrix in neural networks using
Kronecker product singular value decomposition", "KFAC corrected"). The residual is applied
matrix-free: ``R v - vec(G) <vec(A), v>`` and ``R^T u - vec(A) <vec(G), u>``, with the products of
``R`` from the captures (:class:`~curvlib.extensions.rearranged.RearrangedBlock`).

Source: one curvature source for both terms -- the exact one (``"type-2-exact"`` for
``fisher_type="type-2"``). The KFAC term uses the KFAC formulas
(:class:`~curvlib.extensions.kfac.KFAC`, ``kfac_approx``) on that source, so it equals
``p.kfac`` of ``KFAC(fisher_type)`` whenever the network output has no weight-sharing positions
(classification, regression); with per-position outputs (e.g. sequence losses) it is the KFAC
formula applied to the exact per-position Hessian square root instead of curvlinops' shared
columns. The correction ``S ⊗ R`` uses the conventions of :mod:`~curvlib.extensions.kronecker_svd_base`
(``sqrt`` of the singular value in each factor, sign by trace). First factors are over
``p.shape[0]``: ``p.kfac_corrected = [[G, A], [S, R]]`` (``[[A, G], [S, R]]`` ordered like
``p.kfac`` for transposed convolutions); ``[[G]]`` per bias, the exact bias block. Grouped /
depthwise layers get the block form (:meth:`KFACCorrected.grouped_weight_terms`): ``[G, A]``
KFAC's ``[B, m, m], [B, n, n]`` and per group the best Kronecker fit of the residual of the
group's diagonal block.
"""
from __future__ import annotations

from typing import Any, List, Optional

from torch import Tensor

from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import KFAC_APPROX, kfac_act_factor, kfac_cot_factor
from curvlib.extensions.kronecker_svd_base import KroneckerSVDExtension
from curvlib.extensions.rearranged import RearrangedBlock


class KFACCorrected(KroneckerSVDExtension):
    r"""``p.kfac_corrected = [[G, A], [S, R]]``: KFAC plus the rank-1 KPSVD of its residual.

    The block of ``p.flatten()`` is approximated by ``kron(G, A) + kron(S, R)``: ``[G, A]`` are
    the :class:`~curvlib.extensions.kfac.KFAC` factors of the same source (module docstring for
    when they equal ``p.kfac``), ``kron(S, R)`` the best Kronecker approximation (Frobenius) of the
    residual, in general indefinite. Shapes as for KFAC: ``G, S`` ``[out, out]``, ``A, R``
    ``[in * prod(kernel), ...]`` for a weight ``[out, in, *kernel]`` (transposed convolutions:
    ``[[A, G], [S, R]]``, first factors over ``p.shape[0]``); ``[[G]]`` per bias, the exact
    bias block ``[out, out]``.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: sampled targets per datum for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (the KFAC term's weight-sharing formula).
        method: ``"lanczos"`` (default) or ``"power"`` / ``"deflation"`` for the residual's top
            triplet. Lanczos is the default: the residual's leading singular values are often
            clustered, and in float32 the subtraction ``R v - vec(G) <vec(A), v>`` leaves a noise
            floor near power iteration's ``sqrt(eps)`` tolerance (on the MLP of
            ``benchmarks/bench_kpsvd.py`` power iteration hits ``maxiter``; Lanczos needs ~20 products).
        maxiter, tol, warm_start, algorithm: as for :class:`~curvlib.extensions.kpsvd.KPSVD`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import KFACCorrected
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> from curvlib.solvers import KroneckerInverse
        >>> with curvature(KFACCorrected(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> W = model[0].weight                  # [3, 4]
        >>> (G, A), (S, R) = W.kfac_corrected
        >>> G.shape, A.shape, S.shape, R.shape
        (torch.Size([3, 3]), torch.Size([4, 4]), torch.Size([3, 3]), torch.Size([4, 4]))
        >>> KroneckerInverse(W.kfac_corrected, damping=1.0)(W.grad).shape
        torch.Size([3, 4])
    """

    savefield = "kfac_corrected"
    block_form = True
    default_method = "lanczos"

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1, kfac_approx: str = "expand", *solver: Any, **solver_kw: Any):
        # solver options (method, maxiter, tol, warm_start, algorithm): KroneckerSVDExtension's
        super().__init__(fisher_type, mc_samples, *solver, **solver_kw)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"curvlib: KFACCorrected(kfac_approx={kfac_approx!r}) is not one of {KFAC_APPROX}.")
        self.kfac_approx = kfac_approx

    def weight_terms(
        self, p: Tensor, capture: LayerCapture, block: RearrangedBlock, bias_block: Optional[Tensor]
    ) -> List[List[Tensor]]:
        if self.kfac_approx == "reduce" and len(capture.calls) > 1:
            raise NotImplementedError(
                f"curvlib: KFACCorrected(kfac_approx='reduce') on {capture.module}, which was "
                f"called {len(capture.calls)} times before one backward: its correction is "
                "built on the positions of all calls together, where KFAC reduces per call. "
                "Use kfac_approx='expand' (the stacked positions of all calls)."
            )
        # KFAC factors in working coordinates (the formulas commute with the isometric compression)
        G = kfac_cot_factor(block.s, self.kfac_approx)
        A = kfac_act_factor(block.a, self.kfac_approx)
        first, second = capture.orientation.pair(G, A)
        correction = self._svd(p, block, 1, correction=(first, second))
        return [[block.expand(first, 0), block.expand(second, 1)]] + correction

    def grouped_weight_terms(self, p: Tensor, capture: LayerCapture) -> List[List[Tensor]]:
        """Grouped / depthwise layers, block form: ``[[G [B, m, m], A [B, n, n]], [S, R]]`` with
        ``[G, A]`` KFAC's block form (``p.kfac`` of the same source) and, per group, ``kron(S_b, R_b)``
        the best Kronecker approximation of the group's diagonal block minus ``kron(G_b, A_b)``.
        Several backwards of one context: the factors of the joined batch (``G`` summed, ``A``
        averaged over the rows, as KFAC accumulates)."""
        if len(capture.calls) > 1:
            raise NotImplementedError(
                f"curvlib: KFACCorrected on the grouped {capture.module}, which was called "
                f"{len(capture.calls)} times before one backward, is not supported yet; use KPSVD or "
                "KFAC (block form) for it."
            )
        G, A = capture.kfac_weight_factors(self.source, self.kfac_approx)
        n = capture.batch_size if self.kfac_approx == "reduce" else capture.act_rows()
        key = (capture.module, "grouped-kfac")
        prev = self._joined.get(key)
        if prev is not None and prev[0] < capture.backward:
            _, G0, A0, n0 = prev
            G, A, n = G0 + G, (A0 * n0 + A * n) / (n0 + n), n0 + n
        self._joined[key] = (capture.backward, G, A, n)
        first, second = capture.orientation.pair(G, A)
        return [[first, second]] + self._grouped_terms(p, capture, 1, correction=(first, second))

    def __repr__(self) -> str:
        return (
            f"KFACCorrected(fisher_type={self.fisher_type!r}, mc_samples={self.mc_samples}, "
            f"kfac_approx={self.kfac_approx!r}, method={self.method!r}, algorithm={self.algorithm!r})"
        )


__all__ = ["KFACCorrected"]
