"""Base class of curvature extensions: pure functions of a layer's captures.

Implements the engine's contract :class:`curvlib.engine.extension.Extension` with the
``fisher_type`` vocabulary and default accumulation.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Iterable, Optional, Set, Tuple

import torch

from curvlib.engine.capture import LayerCapture, Source, source_key
from curvlib.engine.extension import Extension as EngineExtension

FISHER_TYPES = ("type-2", "mc", "empirical")


class Extension(EngineExtension):
    """A quantity computed from the captures of every extended layer.

    Subclasses set :attr:`savefield` and implement :meth:`compute`, which returns
    ``{"weight": value, "bias": value}`` for the layer's parameters; the engine stores
    each value as ``param.<savefield>``.

    Args:
        fisher_type: ``"type-2"`` (exact GGN / Fisher), ``"mc"`` (Fisher with
            ``mc_samples`` sampled targets) or ``"empirical"`` (true-label gradients).
        mc_samples: number of sampled targets per datum for ``"mc"`` (must be 1 for the
            other fisher types).
    """

    savefield: ClassVar[str] = ""
    #: whether type-2 needs the exact per-position square root (see capture sources)
    exact_type2: ClassVar[bool] = True
    #: whether the engine scans the results for NaN/Inf; an extension with large results
    #: (per-sample gradients) sets ``False`` and checks its (smaller) inputs itself
    check_finite: ClassVar[bool] = True
    #: what the engine does when a sub-module of the extended model couples the samples of
    #: the batch (BatchNorm in training mode, see :mod:`curvlib.engine.coupling`):
    #: ``"raise"`` (quantities defined through per-sample gradients: exact blocks, products,
    #: per-sample gradients), ``"warn"`` (an approximation that then treats the samples as
    #: independent; warned once per model) or ``"exact"`` (unaffected)
    coupled_samples: ClassVar[str] = "raise"
    #: how the results of several ``backward`` calls in one ``curvature`` context combine
    #: (gradient accumulation, see :meth:`accumulate`): ``"sum"``, ``"cat"`` (along dim 0),
    #: ``"custom"`` (the subclass overrides :meth:`accumulate`) or ``None`` (cannot: the
    #: engine raises at the second backward)
    accumulation: ClassVar[Optional[str]] = None

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1):
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"curvlib: {type(self).__name__}(fisher_type={fisher_type!r}) is not one "
                f"of {FISHER_TYPES}."
            )
        if int(mc_samples) < 1:
            raise ValueError(
                f"curvlib: {type(self).__name__}(mc_samples={mc_samples}) must be >= 1."
            )
        if int(mc_samples) != 1 and fisher_type != "mc":
            raise ValueError(
                f"curvlib: {type(self).__name__}(fisher_type={fisher_type!r}, "
                f"mc_samples={mc_samples}): mc_samples applies to fisher_type='mc' only; "
                "leave it at 1 or use fisher_type='mc'."
            )
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)

    #: ``id``s of the parameters this extension is restricted to (:meth:`restrict`), ``None``: all
    _only: Optional[frozenset] = None

    def restrict(self, params: Optional[Iterable[torch.Tensor]]) -> "Extension":
        """Compute this quantity only for ``params`` (``None``: for every parameter, the default)
        and return ``self``. The engine hands :meth:`compute` captures restricted to these and
        builds nothing for the layers of the others (an optimizer's param groups without this
        curvature: ``curvature=None`` or ``"diag"`` groups get no Kronecker factors)."""
        self._only = None if params is None else frozenset(id(p) for p in params)
        return self

    def selects(self, param: torch.Tensor) -> bool:
        return self._only is None or id(param) in self._only

    @property
    def source(self) -> Source:
        """The capture source this extension reads."""
        return source_key(self.fisher_type, self.mc_samples, exact=self.exact_type2)

    def sources(self) -> Set[Source]:
        """All capture sources needed (the engine back-propagates exactly these)."""
        return {self.source}

    def begin(self) -> None:
        """Called when a ``curvature`` context is entered."""

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        raise NotImplementedError(f"curvlib: {type(self).__name__} does not implement compute().")

    def finish(self) -> None:
        """Called when the context exits (whole-network quantities are built here)."""

    # ------------------------------------------------------------ accumulation
    def count(self, capture: LayerCapture) -> int:
        """The weight of ``capture`` in :meth:`accumulate`'s ``counts`` (default: ``N``)."""
        return capture.batch_size

    def accumulate(
        self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]
    ) -> Any:
        """Combine ``param.<savefield>`` of the earlier backwards of this context (``old``,
        from ``counts[0]`` samples, see :meth:`count`) with this backward's value ``new``
        (``counts[1]``) for parameter ``name`` of ``capture``'s layer.

        Contract: with the micro-batch losses scaled as for gradient accumulation (so that the
        ``p.grad`` sum is the gradient of the whole batch), the result equals the value of one
        backward on the concatenated batch.
        """
        if self.accumulation == "sum":
            return _tree_add(old, new)
        if self.accumulation == "cat":
            return torch.cat([old, new])
        raise NotImplementedError(
            f"curvlib: {type(self).__name__} cannot accumulate over several backward calls."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fisher_type={self.fisher_type!r}, mc_samples={self.mc_samples})"


def _tree_add(old: Any, new: Any) -> Any:
    """``old + new`` for tensors and (nested) lists of tensors."""
    if isinstance(old, (list, tuple)):
        return type(old)(_tree_add(o, n) for o, n in zip(old, new))
    return old + new
