"""Base class of curvature extensions: pure functions of a layer's captures."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Set

from curvlib.engine.capture import LayerCapture, Source, source_key

FISHER_TYPES = ("type-2", "mc", "empirical")


class Extension:
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
        raise NotImplementedError

    def finish(self) -> None:
        """Called when the context exits (whole-network quantities are built here)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fisher_type={self.fisher_type!r}, mc_samples={self.mc_samples})"
