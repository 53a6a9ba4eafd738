"""``max_factor_dim``: the largest Kronecker factor side kept dense (docs/design.md §2).

A factor side of dimension ``d`` costs ``d^2`` entries and an ``O(d^3)`` eigendecomposition or
Cholesky factorization at every inverse update: a vocabulary-sized side (GPT-2's 50,257 tokens)
is a 10 GB factor. Above ``max_factor_dim`` the Kronecker extensions keep that side diagonal:
:class:`~curvlib.extensions.KFAC` (and :class:`~curvlib.extensions.EKFAC`, whose eigenbasis of
a 1-D factor is the identity) store it 1-D, ``diag(F)`` computed without forming ``F``
(``diag(sum_r x_r x_r^T) = sum_r x_r * x_r``); the Kronecker-SVD extensions (KPSVD,
KFACCorrected), whose terms have no diagonal form, refuse such a layer with an error naming it.
The default, :data:`~curvlib.engine.factors.MAX_FACTOR_DIM`, is measured there.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from torch import Tensor

from curvlib.engine import factors
from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import MAX_FACTOR_DIM


def check_max_factor_dim(value: Optional[int], where: str) -> None:
    """``max_factor_dim`` is a positive int or ``None`` (no limit)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"curvlib: {where}(max_factor_dim={value!r}) must be a positive int or None.")


def factor_sides(capture: LayerCapture, name: str) -> Tuple[int, ...]:
    """The factor dimensions of parameter ``name``: ``(cotangent side, activation side)`` of a
    weight (``p.shape[0]`` and ``p[0].numel()`` in the layer's orientation; per block in the block
    form over ``B`` groups, whose first factor is over ``p.shape[0] / B``), ``(p.numel(),)`` of a
    summed parameter (a bias, a norm layer's scale: ``[G]``; per block likewise); a tied
    parameter's in ``p``'s order."""
    p = capture.params[name]
    if capture.uses is not None:
        B = 1
    elif capture.summed(name):
        B = capture.adapter.bias_blocks(capture.module) if name == "bias" else 1
    else:
        B = capture.adapter.blocks(capture.module)
    if capture.summed(name):
        return (p.numel() // B,)
    d0 = p.shape[0]
    dims = [d0 // B, p.numel() // max(d0, 1)]
    if capture.uses is not None:  # a tied parameter: no one orientation, p's order
        return tuple(dims)
    return tuple(capture.orientation.unpair(dims))


class FactorDims:
    """Mixin of the Kronecker extensions: :attr:`max_factor_dim`, overridable per parameter."""

    max_factor_dim: Optional[int] = MAX_FACTOR_DIM

    def _init_factor_dims(self, max_factor_dim: Optional[int]) -> None:
        check_max_factor_dim(max_factor_dim, type(self).__name__)
        self.max_factor_dim = max_factor_dim
        #: id(parameter) -> its own ``max_factor_dim`` (:meth:`limit_factor_dim`: an optimizer's
        #: param groups), overriding :attr:`max_factor_dim`
        self.factor_dims: Dict[int, Optional[int]] = {}

    def limit_factor_dim(self, params: Iterable[Tensor], max_factor_dim: Optional[int]):
        """Give ``params`` their own ``max_factor_dim`` (an optimizer param group's); returns ``self``."""
        check_max_factor_dim(max_factor_dim, type(self).__name__)
        for p in params:
            self.factor_dims[id(p)] = max_factor_dim
        return self

    def factor_limit(self, p: Tensor) -> Optional[int]:
        """The ``max_factor_dim`` that applies to parameter ``p``."""
        return self.__dict__.get("factor_dims", {}).get(id(p), self.max_factor_dim)

    def diagonal_sides(self, capture: LayerCapture, name: str) -> Tuple[bool, ...]:
        """Which factor sides of parameter ``name`` (:func:`factor_sides`' order) are above its
        ``max_factor_dim``."""
        limit = self.factor_limit(capture.params[name])
        return tuple(factors.exceeds(d, limit) for d in factor_sides(capture, name))

    def refuse_large_factors(self, capture: LayerCapture, why: str, fix: str = "") -> None:
        """Raise ``NotImplementedError`` naming the layer if a factor side of one of its parameters
        is above ``max_factor_dim`` (an extension without a diagonal form, ``why``; ``fix``: what
        else to use)."""
        for name, p in capture.params.items():
            if any(FactorDims.diagonal_sides(self, capture, name)):
                raise NotImplementedError(
                    f"curvlib: {type(self).__name__} of the {name} of {capture.module} (shape "
                    f"{tuple(p.shape)}): a Kronecker factor side {factor_sides(capture, name)} is above "
                    f"max_factor_dim={self.factor_limit(p)}, and {why}. {fix}Raise max_factor_dim "
                    "(None: no limit) if the dense factor fits."
                )


__all__ = ["FactorDims", "check_max_factor_dim", "factor_sides"]
