"""The contract between the engine and an extension: what :class:`~curvlib.engine.context.curvature`
calls, and nothing else.

The engine does not import :mod:`curvlib.extensions`; it accepts any instance of
:class:`Extension` (``curvlib.extensions.base.Extension`` implements it with the
``fisher_type`` vocabulary; wrappers such as ``SubBatch`` implement it by delegation).
Per layer call reached by a backward inside the context, the engine calls
:meth:`Extension.compute` with the layer's :class:`~curvlib.engine.capture.LayerCapture` and
stores each returned value as ``param.<savefield>``; over several backwards of one context it
combines them with :meth:`Extension.accumulate`.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Dict, Optional, Set, Tuple

from torch import Tensor

from curvlib.engine.capture import LayerCapture, Source


class Extension(abc.ABC):
    """What the engine needs from an extension.

    Attributes (class attributes or properties of every implementation):
        savefield: the parameter attribute the results go to (``p.<savefield>``); at most one
            extension per savefield in a context.
        check_finite: whether the engine scans the results for NaN/Inf (an extension with large
            results, e.g. per-sample gradients, sets ``False`` and checks its inputs itself).
        coupled_samples: what the engine does when a module of the extended model couples the
            samples of the batch (BatchNorm in training mode, :mod:`curvlib.engine.coupling`):
            ``"raise"`` (quantities defined through per-sample gradients), ``"warn"`` (an
            approximation that then treats the samples as independent; warned once per model)
            or ``"exact"`` (unaffected).
        accumulation: how the results of several ``backward`` calls in one context combine
            (:meth:`accumulate`): ``"sum"``, ``"cat"`` (along dim 0), ``"custom"`` or ``None``
            (cannot: the engine raises at the second backward).
        lazy_columns: ``True`` if :meth:`compute` reads the cotangent columns only through
            ``capture.lazy_columns(source)`` products where it gets them (exact GGN products):
            the engine may then leave the columns of early layers unstored
            (:mod:`curvlib.engine.lazy_columns`). Default ``False``.
    """

    savefield: ClassVar[str]
    check_finite: ClassVar[bool]
    coupled_samples: ClassVar[str]
    accumulation: ClassVar[Optional[str]]
    lazy_columns: ClassVar[bool] = False

    @abc.abstractmethod
    def sources(self) -> Set[Source]:
        """The capture sources needed (the engine back-propagates exactly these; see
        :mod:`curvlib.engine.capture`)."""

    @abc.abstractmethod
    def begin(self) -> None:
        """Called when a ``curvature`` context is entered."""

    @abc.abstractmethod
    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        """``{"weight": value, "bias": value, ...}`` for the parameters of ``capture``'s layer
        (``capture.params``: a layer whose other parameters are tied to other layers gets a
        capture restricted to its own). A parameter used by several layers (weight tying) comes
        alone in a :class:`~curvlib.engine.tying.TiedCapture` (``capture.uses`` is not ``None``;
        ``capture.structure(name).kind == "tied"``): no ``act()`` / ``cot()``, its per-sample
        gradients (the sum over the uses) and its uses' own captures instead."""

    @abc.abstractmethod
    def count(self, capture: LayerCapture) -> int:
        """The weight of ``capture`` in :meth:`accumulate`'s ``counts`` (usually ``N``)."""

    @abc.abstractmethod
    def accumulate(
        self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]
    ) -> Any:
        """Combine the value ``old`` of the earlier backwards of the context (from ``counts[0]``)
        with this backward's ``new`` (``counts[1]``) for parameter ``name`` of the layer."""

    def column_reduction(self, source: Source) -> Optional[Callable[[LayerCapture], Dict[str, Tensor]]]:
        """Optional: what :meth:`compute` needs of the cotangent columns of ``source``, if that is
        a sum over the columns ``k`` (e.g. KFAC's ``G = sum_{k,n,t} s s^T``).

        Return a function of a single-call capture whose ``source`` cotangents hold a *slice*
        of the columns (any subset of ``k``, all samples) that gives ``{name: tensor}``, such
        that the values of disjoint slices add up to those of all columns (slices of zero
        columns give zero). If every extension of the context that reads ``source`` returns
        one, the engine back-propagates the columns in chunks, folds each chunk into the sums
        and frees it (the columns of all layers are never alive at once): :meth:`compute` then
        reads the sums with ``capture.reduction(self, source)`` (per call, see
        ``capture.calls``) and the captures hold no ``source`` columns. The sums are formed in
        place in the first chunk's tensors, so these must be the function's own (fresh results,
        not views of the capture or of anything kept elsewhere). ``None`` (the default):
        :meth:`compute` gets the columns.
        """
        return None

    def selects(self, param: Tensor) -> bool:
        """Whether :meth:`compute` gives ``param`` a value (default: every parameter that requires
        gradients). An extension restricted to some parameters (one optimizer param group's)
        returns ``False`` for the others: the engine then hands it captures restricted to the
        selected parameters, and none for a layer with no selected parameter, so nothing is built
        for the others (no ``[D, D]`` factor of a vocabulary head in a group without curvature)."""
        return True

    @abc.abstractmethod
    def finish(self) -> None:
        """Called when the context exits without error (whole-network quantities are built here)."""


__all__ = ["Extension", "Source"]
