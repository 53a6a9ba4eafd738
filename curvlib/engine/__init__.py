"""Engine: hooks, captures, layer adapters, operation rules and loss adapters (one backward pass)."""
from curvlib.engine.capture import LayerCapture, source_key
from curvlib.engine.context import curvature
from curvlib.engine.coupling import is_coupling, register_coupling
from curvlib.engine.extension import Extension
from curvlib.engine.hooks import extend
from curvlib.engine.layers import LayerAdapter, adapter_for, register_adapter, register_op_rule
from curvlib.engine.layers.ops import OpRule
from curvlib.engine.losses import LossAdapter, loss_adapter_for
from curvlib.engine.tying import TiedCapture

__all__ = [
    "extend",
    "curvature",
    "LayerCapture",
    "TiedCapture",
    "Extension",
    "source_key",
    "LayerAdapter",
    "adapter_for",
    "register_adapter",
    "OpRule",
    "register_op_rule",
    "LossAdapter",
    "loss_adapter_for",
    "register_coupling",
    "is_coupling",
]
