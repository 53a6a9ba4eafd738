"""The engine's process-wide state, in one object: :data:`ENGINE`.

Everything the hooks, the ``curvature`` context and the column back-propagation share across
calls lives here, documented field by field, and nowhere else (the registries of layer, loss and
coupling types are configuration, kept with their modules). Code reads and writes the fields
directly (``ENGINE.active``, ``ENGINE.tape[uid]``); the two flags that must be restored after a
nested operation are set through :meth:`EngineState.extra_backward` and
:meth:`EngineState.hooks_paused`.

Lifetimes: the weak containers never keep a model, a layer or a record alive; the records
(:class:`~curvlib.engine.records.LayerCall`) are owned by the extended model of their forward
(see :mod:`curvlib.engine.hooks`).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterator, List, Optional, Set, Tuple

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:  # pragma: no cover
    from curvlib.engine.records import LayerCall


class EngineState:
    """The engine's shared state (one instance, :data:`ENGINE`)."""

    def __init__(self) -> None:
        # ------------------------------------------------------------ capture
        #: the active :class:`~curvlib.engine.context.curvature` context, or ``None`` (contexts
        #: do not nest); typed ``Any``: this module imports no module that imports it
        self.active: Optional[Any] = None
        #: live layer calls, ``uid -> LayerCall`` in forward order, whose backward has not been
        #: processed yet; weak: the extended model owns them (``hooks.record_call``)
        self.tape: "weakref.WeakValueDictionary[int, LayerCall]" = weakref.WeakValueDictionary()
        #: ``hooks.calls_key(layer) -> its live calls``: a layer with several (shared weights,
        #: unrolled loops, a model run on two batches before one backward) has its calls of one
        #: backward combined (``curvature.process_layer``)
        self.calls_of: "weakref.WeakKeyDictionary[object, weakref.WeakSet[LayerCall]]" = weakref.WeakKeyDictionary()
        # ------------------------------------------------------------ weight tying
        #: ``parameter -> weakref`` of the first layer key (a module, or a part's ``calls_key``)
        #: that applied it (:func:`curvlib.engine.tying.note_params`)
        self.param_layer: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: ``layer key -> its parameters`` when last recorded (a changed tuple is registered anew)
        self.layer_params: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()
        #: ``layer key -> TieGroup`` of the layers that share a parameter with another layer: the
        #: group is their common key in ``calls_of`` and in the context's pending captures
        self.tie_groups: "weakref.WeakKeyDictionary[object, Any]" = weakref.WeakKeyDictionary()
        #: the extended models whose forward is running (innermost last), each with the
        #: ``(args, kwargs)`` of that forward (tensors detached): tags the calls it makes
        self.forwards: List[Tuple[nn.Module, Tuple[tuple, Dict[str, Any]]]] = []
        #: the interceptions of the composite layers whose forward is running (innermost last):
        #: ``(layer, context manager)`` (``LayerAdapter.intercept``, e.g. attention), and the
        #: operation capture of an extended model's forward as ``(model, OpCapture)``
        self.intercepts: List[Tuple[nn.Module, Any]] = []
        #: the active operation capture (:class:`curvlib.engine.operations.OpCapture`), or ``None``
        self.op_capture: Optional[Any] = None
        # ------------------------------------------------------------ flags
        #: ``True`` while the engine back-propagates its own extra cotangents (a nested
        #: backward whose hooks must not capture anything)
        self.in_extra_backward: bool = False
        #: ``True`` while an extension re-runs an extended model itself (HMP's functional
        #: forward): forward hooks record nothing and leave the tape alone
        self.paused: bool = False
        # ------------------------------------------------------------ remembered per model
        #: model -> training modes in which the coupled-samples probe ran
        #: (:class:`~curvlib.engine.coupling.CouplingCheck`)
        self.probed: "weakref.WeakKeyDictionary[nn.Module, Set[bool]]" = weakref.WeakKeyDictionary()
        #: models already warned about coupled samples (once each)
        self.warned_coupling: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        #: layers already warned about taking part in no call of a backward (once each)
        self.warned_uncalled: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        #: parameter -> the operations its uncovered uses were warned about (once each)
        self.warned_ops: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
        #: models whose backward has no batching rule for some operation (the ``out=`` kernels of
        #: ``torch.compile``d graphs): their columns go one at a time (:mod:`curvlib.engine.columns`)
        self.no_batching: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def extra_backward(self) -> ContextManager[None]:
        """The engine's own backward of extra cotangents runs inside this block."""
        return self._raised("in_extra_backward")

    def hooks_paused(self) -> ContextManager[None]:
        """Extended models run inside this block record nothing (the tape is left untouched)."""
        return self._raised("paused")

    @contextlib.contextmanager
    def _raised(self, flag: str) -> Iterator[None]:
        """``flag`` is ``True`` inside the block and restored after it."""
        old = getattr(self, flag)
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, old)


#: the engine's state (module docstring)
ENGINE = EngineState()

__all__ = ["EngineState", "ENGINE"]
