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

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Type

import torch
from torch import Tensor, nn

from curvlib.engine.layers import adapter_for
from curvlib.engine.records import LayerCall
from curvlib.engine.state import ENGINE

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


def same_batch(call: LayerCall, f: Tensor) -> bool:
    """Whether the leading dimension of the loss input ``f`` is the batch of ``call``'s layer
    (not so for an unbatched input, e.g. CE on ``[C]`` after a conv on ``[C_in, H, W]``, or
    for a pending call of another model)."""
    if call.input is None:
        return False
    n = adapter_for(call.module).batch_size(call.module, call.input)
    return n == f.shape[0] and n > 1


#: key of the probe's column among the extra cotangents of a loss
PROBE = object()


class CouplingCheck:
    """Coupled-sample detection for one ``curvature`` context (module docstring): the module
    scan per backward and model, the generic probe, and what each extension does about a
    coupling (``Extension.coupled_samples``).

    Args:
        extensions: the context's extensions.
    """

    def __init__(self, extensions: Sequence):
        self.extensions = list(extensions)
        self.reset()

    def reset(self) -> None:
        """Forget what this context found (on entering it)."""
        #: uids of layer calls whose probe column leaked to other samples
        self.leaks: Set[int] = set()
        #: per backward: ``id(model) -> its coupling modules`` (scanned once per backward)
        self.found: Dict[int, list] = {}

    def new_backward(self) -> None:
        self.found = {}

    def probe(self, calls: List[LayerCall], f: Tensor) -> Optional[Tensor]:
        """On the first capture of a model (per training mode): one extra output cotangent
        ``[1, *f.shape]``, nonzero on sample 0 only, back-propagated with the others
        (:data:`PROBE`); a layer whose cotangent is nonzero on another sample has a coupling
        module downstream (:meth:`observe`). ``None`` when no probe is due."""
        if f.ndim == 0 or f.shape[0] < 2:
            return None
        if not any(same_batch(c, f) for c in calls):
            return None
        if all(e.coupled_samples == "exact" for e in self.extensions):
            return None
        new = False
        for root in {id(c.root): c.root for c in calls if c.root is not None}.values():
            modes = ENGINE.probed.setdefault(root, set())
            if root.training not in modes:
                modes.add(root.training)
                new = True
        if not new:
            return None
        gen = torch.Generator().manual_seed(0)  # leaves the global random stream alone
        v = torch.zeros((1,) + tuple(f.shape), dtype=f.dtype, device=f.device)  # on f's device: no host copy
        v[0, 0] = torch.rand(f.shape[1:], generator=gen, dtype=f.dtype).to(f.device) + 0.5
        return v

    def observe(self, call: LayerCall, part: Tensor, f: Tensor) -> None:
        """The probe's column ``part`` ``[1, *output_shape]`` at ``call``: did sample 0's output
        cotangent leak into other samples?"""
        if same_batch(call, f) and bool(part[0, 1:].ne(0).any()):
            self.leaks.add(call.uid)

    def check(self, root: Optional[nn.Module], call: Optional[LayerCall] = None) -> None:
        """Raise or warn (per extension) if ``root`` couples the samples of the batch (a known
        coupling module, or the probe leaked at ``call``'s layer)."""
        if call is not None and call.uid in self.leaks and root is not None:
            name = next((n for n, m in root.named_modules() if m is call.module), type(call.module).__name__)
            self._on_coupling(
                root,
                f"a module downstream of the layer '{name}' ({type(call.module).__name__}) of the "
                f"extended model {type(root).__name__} (the output cotangent of one sample "
                "reached the other samples there)",
            )
        if call is not None and root is not None and getattr(call.module, "couples_samples", False):
            # a functional batch_norm with batch statistics (curvlib.engine.layers.op_norm)
            self._on_coupling(root, f"{call.module} (batch_norm with the batch's statistics)")
        if root is None or id(root) in self.found:
            return
        found = self.found[id(root)] = coupling_modules(root)
        if not found:
            return
        self._on_coupling(root, describe(root, found))

    def _on_coupling(self, root: nn.Module, where: str) -> None:
        strict = [e for e in self.extensions if e.coupled_samples == "raise"]
        if strict:
            raise RuntimeError(
                f"curvlib: {', '.join(type(e).__name__ for e in strict)} needs independent "
                f"samples, but {where} couples the samples of the batch (e.g. BatchNorm with "
                "batch statistics in training mode): per-sample gradients and exact curvature "
                "blocks are then not what this extension computes. To train such a network in "
                "training mode, use KFAC (curvature='kfac' in curvlib.optim), which treats the "
                "samples as independent (an approximation, announced once). model.eval() makes "
                "the samples independent, but a training step taken in eval mode trains with the "
                "running statistics (and does not update them): use it only for a curvature "
                "backward that is not a training step."
            )
        loose = [e for e in self.extensions if e.coupled_samples == "warn"]
        if loose and root not in ENGINE.warned_coupling:
            ENGINE.warned_coupling.add(root)
            warnings.warn(
                f"curvlib: {', '.join(type(e).__name__ for e in loose)} treats the samples "
                f"as independent, but {where} couples them (e.g. BatchNorm with batch "
                "statistics in training mode); the result is the approximation with the "
                "coupling ignored (announced once per model). This is the supported way to train "
                "BatchNorm networks in training mode with curvlib.optim: keep the model in train "
                "mode. Do not switch to model.eval() for a training step (it would train with the "
                "running statistics); eval mode is only for a curvature backward that is not a "
                "training step.",
                stacklevel=2,
            )


__all__ = ["register_coupling", "is_coupling", "coupling_modules", "describe", "same_batch", "PROBE", "CouplingCheck"]
