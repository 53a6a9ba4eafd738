"""Process-wide engine state: the active ``curvature`` context and the forward tape.

The tape refers (weakly) to one :class:`~curvlib.engine.records.LayerCall` per forward
call of an extended layer, in forward order, until the backward through that call has
been seen or the model runs its next forward.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from curvlib.engine.context import curvature
    from curvlib.engine.records import LayerCall

#: the innermost active ``curvature`` context, or ``None``
ACTIVE: Optional["curvature"] = None

#: live layer calls (forward order) whose backward has not been processed yet; weak:
#: the extended model owns them (see ``hooks._layer_forward_hook``)
TAPE: "weakref.WeakValueDictionary[int, LayerCall]" = weakref.WeakValueDictionary()

#: module -> its live calls (recorded, not yet back-propagated): a module with several
#: (shared weights, unrolled loops, a model run on two batches before one backward) has
#: its calls of one backward combined (``context.curvature.process_layer``)
CALLS_OF: "weakref.WeakKeyDictionary[object, weakref.WeakSet[LayerCall]]" = weakref.WeakKeyDictionary()

#: ``True`` while the engine back-propagates its own extra cotangents (nested backward)
IN_EXTRA_BACKWARD: bool = False

#: ``True`` while an extension re-runs an extended model itself (e.g. HMP's functional
#: forward): forward hooks record nothing and leave the tape alone
HOOKS_PAUSED: bool = False
