"""Parts: layer-like views of parameters that a module applies functionally.

A *part* stands where the engine expects a layer (``LayerCall.module``, the key of a capture) when
no module hook sees the parameters: the linear parts of ``nn.MultiheadAttention`` and of the
recurrent layers (:class:`Projection`), and a parameter used through an operation inside any
module or in functional code (``F.linear``, ``x @ W``, ``conv*``, ``F.embedding``, the affine
part of the norm functions, an elementwise scale or shift: the ``op_*`` modules beside this one).

What the engine needs of a part: ``weight`` / ``bias`` attributes (the parameters, or ``None``),
:meth:`~Part.parameters`, a stable :attr:`~Part.calls_key`, and equality by ``(owner, name)``:
the parts of one forward are new objects, and the parts of the same parameters through the same
operation compare equal, so that the calls of one part before one backward are combined as
positions (docs/design.md §2, "a layer called several times"). Each part type has one adapter
(:mod:`curvlib.engine.layers.base`), registered in ``curvlib.engine.layers.ADAPTERS``.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

#: ``(positions, blocks)`` per input segment of a stacked projection
Segments = Tuple[Tuple[int, Tuple[int, ...]], ...]


class Part:
    """Parameters of ``owner`` applied by one operation, as seen by one forward call.

    Attributes:
        owner: the ``nn.Module`` whose parameters these are (names the part in messages and keeps
            its :attr:`calls_key`); ``name``: the part within the owner.
        weight, bias: the parameters (``None`` where absent).
        label: how messages name the part (default ``"Owner.name"``).
    """

    def __init__(self, owner: nn.Module, name: str, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, label: Optional[str] = None):
        self.owner, self.name = owner, name
        self.weight, self.bias = weight, bias
        self.label = label

    def parameters(self, recurse: bool = True):
        return iter([p for p in (self.weight, self.bias) if p is not None])

    @property
    def calls_key(self) -> object:
        """The engine's key for the live calls of this part (``ENGINE.calls_of``): one object per
        ``(owner, name)``, kept on the owner. A part object lives only as long as its call
        records, so it cannot be that key itself: the parts of the next forward would be
        registered under a key whose death (when the earlier records are dropped, possibly
        during the backward) takes their live calls with it."""
        keys = self.owner.__dict__.setdefault("_curvlib_part_keys", {})
        return keys.setdefault(self.name, _PartKey())

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.owner is self.owner and other.name == self.name

    def __hash__(self) -> int:
        return hash((id(self.owner), self.name))

    def __repr__(self) -> str:
        return self.label or f"{type(self.owner).__name__}.{self.name}"


class _PartKey:
    """A weak-referenceable token: :attr:`Part.calls_key`."""


class Projection(Part):
    """One linear part ``y = x W^T + b`` of a composite layer (attention, recurrent layers).

    Attributes:
        blocks: ``B`` of the weight's KFAC block form; ``bias_blocks``: of the bias.
        segments: ``((T_i, blocks_i), ...)``: the input is ``T_i`` positions per segment, stacked
            along the positions, segment ``i`` feeding the row blocks ``blocks_i``.
    """

    def __init__(
        self,
        owner: nn.Module,
        name: str,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        blocks: int = 1,
        bias_blocks: int = 1,
        segments: Segments = (),
    ):
        super().__init__(owner, name, weight, bias)
        self.blocks, self.bias_blocks, self.segments = blocks, bias_blocks, segments


__all__ = ["Part", "Projection", "Segments"]
