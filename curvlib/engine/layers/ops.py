"""The contract between the operation capture and its rules (one rule per ``op_*`` module).

While an extended model whose parameters are not all in adapted modules runs its forward, the
operation capture (:class:`curvlib.engine.operations.OpCapture`, a ``TorchFunctionMode``) sees
every torch function. A call whose arguments include such a parameter (requiring gradients) goes
to the :class:`OpRule` registered for that function. The rule either returns
:data:`NOT_COVERED` (then the parameter's use is named in a warning if it reaches the loss) or
runs the operation itself, recording the call of a part (:mod:`curvlib.engine.layers.parts`)
through :meth:`OpCall.record`, and returns the operation's value. A part type has one layer
adapter, so the rule's calls reach every extension through the layer contract
(:mod:`curvlib.engine.layers.base`) with no extension change.

A rule records *per-sample* views of the operation's input and output (the samples in dimension
0, :func:`~curvlib.engine.layers.batch_layout.per_sample`) and returns the restored output, or
raises (:meth:`OpCall.unknown_batch`) when the grouping of its input's rows into samples is not
known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple

from torch import Tensor, nn

from curvlib.engine.layers.batch_layout import Layout, layout_of

#: what a rule returns for a call it does not describe
NOT_COVERED = object()


@dataclass(frozen=True)
class ParamUse:
    """A parameter (or a view of it) among an operation's arguments.

    Attributes:
        param: the ``nn.Parameter``; ``tensor``: the argument (``param`` or a view of it).
        name: its qualified name in the extended model; ``owner``: the module holding it.
        kind: how ``tensor`` relates to ``param``: ``"same"`` (itself or a dtype / device copy),
            ``"T"`` (the transpose of a 2-D parameter), ``"reshaped"`` (the same entries in the same
            order, another shape: ``unsqueeze``, ``view``, ...).
    """

    param: nn.Parameter
    tensor: Tensor
    name: str
    owner: nn.Module
    kind: str = "same"

    @property
    def attr(self) -> str:
        return self.name.rsplit(".", 1)[-1]


class OpCall:
    """One call of a torch function with a parameter among its arguments, as a rule sees it.

    Attributes:
        func: the torch function; ``args``, ``kwargs``: its arguments; ``op``: its readable name.
    """

    def __init__(self, capture: Any, func: Callable, args: tuple, kwargs: dict, op: str):
        self._capture = capture
        self.func, self.args, self.kwargs, self.op = func, args, kwargs, op

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional) or ``name`` (keyword)."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def param(self, t: Any) -> Optional[ParamUse]:
        """The parameter use ``t`` is, if it is a parameter (or a view of one) that the capture
        describes (outside adapted modules, requiring gradients); else ``None``."""
        return self._capture.param_use(t) if isinstance(t, Tensor) else None

    def layout(self, t: Tensor) -> Layout:
        return layout_of(t)

    def record(self, part: Any, x: Tensor, y: Tensor) -> None:
        """Record one call of ``part`` with (per-sample) input ``x`` and output ``y`` in the graph."""
        self._capture.record(part, x, y)

    def label(self, uses: Sequence[ParamUse]) -> str:
        """How messages name the part of ``uses``: ``"addmm of 'h.0.attn.c_attn.weight', ..."``."""
        return f"{self.op} of " + ", ".join(f"'{u.name}'" for u in uses)

    def samples_first(self, uses: Sequence[ParamUse], x: Tensor) -> None:
        """Raise unless the samples are exactly dimension 0 of the input ``x`` (operations whose
        batch dimension is their own: convolutions, ``group_norm``, ``batch_norm``)."""
        L = layout_of(x)
        if not (L.known and L.dim == 0 and L.rows == 1):
            self.unknown_batch(uses, "input", L)

    def unknown_batch(self, uses: Sequence[ParamUse], what: str, L: Layout) -> None:
        """Raise: the samples of ``what`` (an argument of this call) cannot be located."""
        names = ", ".join(f"'{u.name}'" for u in uses)
        reason = (
            "its rows come from a reshape that mixes the samples of the batch, or from an operation "
            "whose row structure curvlib does not follow"
            if not L.known else
            f"the samples are in dimension {L.dim}, which the operation contracts or needs as its "
            "own batch dimension"
        )
        raise NotImplementedError(
            f"curvlib: the parameter {names} is used by {self.op}, but which rows of its {what} "
            f"belong to which sample is not known ({reason}). Per-sample quantities would be "
            "guessed, so curvlib refuses. Keep the samples in dimension 0 of the operation's input "
            "(reshapes that merge dimension 0 with the following ones are fine, e.g. "
            "x.view(-1, x.shape[-1]) of x [N, T, D])."
        )


class OpRule:
    """Describes the calls of some torch functions that apply a parameter (module docstring)."""

    #: the torch functions (and ``Tensor`` methods) this rule receives
    funcs: ClassVar[Tuple[Callable, ...]] = ()

    def capture(self, call: OpCall) -> Any:
        """The operation's value, with the part's call recorded; or :data:`NOT_COVERED`."""
        raise NotImplementedError


def part_name(op: str, uses: Sequence[ParamUse]) -> str:
    """The part's name within its owner: the operation and the parameters' attribute names."""
    return f"{op}({', '.join(u.name for u in uses)})"


__all__ = ["NOT_COVERED", "ParamUse", "OpCall", "OpRule", "part_name"]
