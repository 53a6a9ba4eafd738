"""Layer adapters: one per parameterised layer type (see :mod:`.base`)."""
from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from curvlib.engine.layers.attention import MultiheadAttentionAdapter, ProjectionAdapter
from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.conv import ConvAdapter
from curvlib.engine.layers.conv_transpose import ConvTransposeAdapter
from curvlib.engine.layers.embedding import EmbeddingAdapter
from curvlib.engine.layers.linear import LinearAdapter
from curvlib.engine.layers.norm import BatchNormAdapter, GroupNormAdapter, LayerNormAdapter, RMSNormAdapter
from curvlib.engine.layers.recurrent import RecurrentAdapter

ADAPTERS: Dict[Type[nn.Module], LayerAdapter] = {}


def register_adapter(adapter: LayerAdapter) -> None:
    """Make ``adapter`` describe its ``module_types`` (the one place to add a layer)."""
    for t in adapter.module_types:
        ADAPTERS[t] = adapter


for _a in (
    LinearAdapter(), ConvAdapter(), ConvTransposeAdapter(), EmbeddingAdapter(),
    LayerNormAdapter(), RMSNormAdapter(), GroupNormAdapter(), BatchNormAdapter(),
    MultiheadAttentionAdapter(), ProjectionAdapter(), RecurrentAdapter(),
):
    register_adapter(_a)


def adapter_for(module: nn.Module) -> Optional[LayerAdapter]:
    """The adapter for ``module``'s type (nearest registered base class), or ``None``."""
    for t in type(module).__mro__:
        if t in ADAPTERS:
            return ADAPTERS[t]
    return None


__all__ = ["LayerAdapter", "ADAPTERS", "register_adapter", "adapter_for"]
