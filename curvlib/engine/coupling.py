"""Modules whose forward couples the samples of a batch (e.g. BatchNorm in training mode).

Per-sample gradients, the exact curvature factorisations ``F = sum_{k,n} X_kn X_kn^T`` and
everything built on them assume that sample ``n`` of the model output depends on sample ``n``
of the input only. A module that normalises with *batch* statistics breaks this: the
back-propagated cotangent of one sample then carries the loss curvature of all others, and the
per-sample decomposition no longer describes the objective (measured: ``DiagGGN("type-2")`` of
a Linear before ``BatchNorm1d`` was 75% off the dense GGN).

The engine looks, once per backward and extended model, for such a module among the model's
sub-modules. What happens then is up to each extension (``Extension.coupled_samples``):
``"raise"`` (exact and per-sample quantities), ``"warn"`` (KFAC, which approximates anyway and
then treats the samples as independent; warned once per model) or ``"exact"`` (HMP, which
re-runs the whole objective).

Known coupling modules: every ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, lazy variants, ``affine=False`` or not) that uses batch statistics, i.e. in
training mode or without running statistics. :func:`register_coupling` adds a type.

Generic probe (for couplings this module does not know): on the first capture of an extended
model in each training mode, with an extended loss, the engine back-propagates one more output
cotangent, nonzero on sample 0 only, with its batched extra cotangents; a layer whose cotangent
is then nonzero on another sample has a coupling downstream and is treated as above (named in
the message). It runs once per model and mode, so a coupling whose derivative vanishes at that
moment (e.g. a zero-initialised scale) is missed; the module scan above runs on every capture.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type

from torch import nn

#: module type -> predicate "this instance couples the samples in its current mode"
_COUPLING: Dict[Type[nn.Module], Callable[[nn.Module], bool]] = {}


def _batchnorm_uses_batch_stats(m: nn.Module) -> bool:
    # the same rule as _BatchNorm.forward: batch statistics in training mode, or always
    # when the module tracks no running statistics
    return m.training or (getattr(m, "running_mean", None) is None and getattr(m, "running_var", None) is None)


def register_coupling(module_type: Type[nn.Module], predicate: Optional[Callable[[nn.Module], bool]] = None) -> None:
    """Declare that instances of ``module_type`` couple the samples of a batch when
    ``predicate(module)`` is true (default: in training mode)."""
    _COUPLING[module_type] = predicate or (lambda m: m.training)


register_coupling(nn.modules.batchnorm._BatchNorm, _batchnorm_uses_batch_stats)


def is_coupling(module: nn.Module) -> bool:
    """Whether ``module`` couples the samples of a batch in its current mode."""
    for t in type(module).__mro__:
        pred = _COUPLING.get(t)
        if pred is not None:
            return bool(pred(module))
    return False


def coupling_modules(root: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every sub-module of ``root`` that couples samples now."""
    return [(name or type(m).__name__, m) for name, m in root.named_modules() if is_coupling(m)]


def describe(root: nn.Module, found: List[Tuple[str, nn.Module]]) -> str:
    """``"'bn1' (BatchNorm1d) of Sequential"``-style description (first three modules)."""
    names = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return f"{names}{more} of the extended model {type(root).__name__}"


__all__ = ["register_coupling", "is_coupling", "coupling_modules", "describe"]
