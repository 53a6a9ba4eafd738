"""Process-wide engine state: the active ``curvature`` context and the forward tape.

The tape holds one :class:`~curvlib.engine.records.LayerCall` per forward call of an
extended layer, in forward order, until the backward through that call has been seen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    from curvlib.engine.context import curvature
    from curvlib.engine.records import LayerCall

#: the innermost active ``curvature`` context, or ``None``
ACTIVE: Optional["curvature"] = None

#: live layer calls (forward order) whose backward has not been processed yet
TAPE: Dict[int, "LayerCall"] = {}

#: ``True`` while the engine back-propagates its own extra cotangents (nested backward)
IN_EXTRA_BACKWARD: bool = False

#: ``True`` while an extension re-runs an extended model itself (e.g. HMP's functional
#: forward): forward hooks record nothing and leave the tape alone
HOOKS_PAUSED: bool = False
