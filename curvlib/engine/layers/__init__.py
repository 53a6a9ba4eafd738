"""Layer adapters: one per parameterised layer type (see :mod:`.base`), and the operation rules:
one per kind of torch function that applies a parameter outside an adapted module (see :mod:`.ops`)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type

from torch import nn

from curvlib.engine.layers.attention import MultiheadAttentionAdapter, ProjectionAdapter
from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.conv import ConvAdapter
from curvlib.engine.layers.conv_transpose import ConvTransposeAdapter
from curvlib.engine.layers.embedding import EmbeddingAdapter
from curvlib.engine.layers.linear import LinearAdapter
from curvlib.engine.layers.norm import BatchNormAdapter, GroupNormAdapter, LayerNormAdapter, RMSNormAdapter
from curvlib.engine.layers.op_broadcast import BroadcastAdapter, BroadcastRule
from curvlib.engine.layers.op_conv import ConvPartAdapter, ConvRule, ConvTransposePartAdapter
from curvlib.engine.layers.op_embedding import EmbeddingPartAdapter, EmbeddingRule
from curvlib.engine.layers.op_linear import LinearPartAdapter, MatmulPartAdapter, MatmulRule
from curvlib.engine.layers.op_norm import (
    BatchNormPartAdapter, GroupNormPartAdapter, LayerNormPartAdapter, NormRule, RMSNormPartAdapter,
)
from curvlib.engine.layers.ops import OpRule
from curvlib.engine.layers.recurrent import RecurrentAdapter

ADAPTERS: Dict[Type[Any], LayerAdapter] = {}
#: torch function -> the rule for its calls with a parameter outside the adapted modules
OP_RULES: Dict[Callable, OpRule] = {}
#: type -> its adapter (or ``None``), as :func:`adapter_for` decides it
_BY_TYPE: Dict[type, Optional[LayerAdapter]] = {}


def register_adapter(adapter: LayerAdapter) -> None:
    """Make ``adapter`` describe its ``module_types`` (the one place to add a layer)."""
    for t in adapter.module_types:
        ADAPTERS[t] = adapter
    _BY_TYPE.clear()


def register_op_rule(rule: OpRule) -> None:
    """Make ``rule`` describe the calls of its ``funcs`` (the one place to add an operation)."""
    for f in rule.funcs:
        OP_RULES[f] = rule


for _a in (
    LinearAdapter(), ConvAdapter(), ConvTransposeAdapter(), EmbeddingAdapter(),
    LayerNormAdapter(), RMSNormAdapter(), GroupNormAdapter(), BatchNormAdapter(),
    MultiheadAttentionAdapter(), ProjectionAdapter(), RecurrentAdapter(),
    # the parts of the operation rules
    LinearPartAdapter(), MatmulPartAdapter(), ConvPartAdapter(), ConvTransposePartAdapter(),
    EmbeddingPartAdapter(), LayerNormPartAdapter(), RMSNormPartAdapter(), GroupNormPartAdapter(),
    BatchNormPartAdapter(), BroadcastAdapter(),
):
    register_adapter(_a)

for _r in (MatmulRule(), ConvRule(), EmbeddingRule(), NormRule(), BroadcastRule()):
    register_op_rule(_r)


def adapter_for(module: Any) -> Optional[LayerAdapter]:
    """The adapter for ``module``'s type (nearest registered base class), or ``None``.

    A module type that overrides the ``forward`` of its registered base (``class
    MyEmbedding(nn.Embedding)`` with a ``forward(mask)`` that computes the indices, a LoRA
    ``nn.Linear``) has none: its module hook would record the wrong input. Its parameters are then
    captured by operation (:mod:`curvlib.engine.operations`), wherever ``forward`` applies them.
    Composite adapters (attention, recurrent layers) intercept the functional kernels and keep
    theirs."""
    cls = type(module)
    try:
        return _BY_TYPE[cls]
    except KeyError:
        pass
    found = None
    for t in cls.__mro__:
        if t in ADAPTERS:
            a = ADAPTERS[t]
            own = getattr(t, "forward", None)
            found = a if a.composite or own is None or getattr(cls, "forward", None) is own else None
            break
    _BY_TYPE[cls] = found
    return found


__all__ = ["LayerAdapter", "ADAPTERS", "OP_RULES", "register_adapter", "register_op_rule", "adapter_for"]
