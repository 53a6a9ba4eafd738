"""Rule: parameters as the affine part of ``layer_norm``, ``rms_norm``, ``group_norm``, ``batch_norm``.

The call is recorded as a part with the attributes of the norm module that would make it
(``normalized_shape`` / ``num_groups``, ``eps``, for ``batch_norm`` ``training`` and the running
statistics), so the adapters of :mod:`~curvlib.engine.layers.norm` describe it unchanged: weight
and bias get their exact blocks ``p.kfac = [G]``. ``layer_norm`` / ``rms_norm`` take per-sample
views (the samples in any dimension before the normalised ones); ``group_norm`` / ``batch_norm``
need the samples in their batch dimension 0. A ``batch_norm`` with batch statistics
(``training=True`` or no running statistics) couples the samples as ``nn.BatchNorm*`` does
(:mod:`curvlib.engine.coupling`: exact quantities raise, KFAC warns).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from curvlib.engine.layers.batch_layout import per_sample, restore
from curvlib.engine.layers.norm import BatchNormAdapter, GroupNormAdapter, LayerNormAdapter, RMSNormAdapter
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, OpRule, part_name
from curvlib.engine.layers.parts import Part


class LayerNormPart(Part):
    """``layer_norm``'s weight and bias over ``normalized_shape``."""

    def __init__(self, owner, name, weight, bias, normalized_shape, eps, label=None):
        super().__init__(owner, name, weight, bias, label)
        ns = normalized_shape
        self.normalized_shape = (int(ns),) if isinstance(ns, int) else tuple(ns)
        self.eps = eps


class RMSNormPart(LayerNormPart):
    """``rms_norm``'s weight over ``normalized_shape`` (``eps=None``: the dtype's epsilon)."""


class GroupNormPart(Part):
    """``group_norm``'s weight and bias over the channels."""

    def __init__(self, owner, name, weight, bias, num_groups, eps, label=None):
        super().__init__(owner, name, weight, bias, label)
        self.num_groups, self.eps = int(num_groups), eps


class BatchNormPart(Part):
    """``batch_norm``'s weight and bias over the channels."""

    def __init__(self, owner, name, weight, bias, running_mean, running_var, training, eps, label=None):
        super().__init__(owner, name, weight, bias, label)
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.eps = bool(training), eps

    @property
    def couples_samples(self) -> bool:
        """Whether the call normalised with the batch's statistics (:mod:`curvlib.engine.coupling`)."""
        return self.training or self.running_mean is None


class LayerNormPartAdapter(LayerNormAdapter):
    module_types = (LayerNormPart,)


class RMSNormPartAdapter(RMSNormAdapter):
    module_types = (RMSNormPart,)


class GroupNormPartAdapter(GroupNormAdapter):
    module_types = (GroupNormPart,)


class BatchNormPartAdapter(BatchNormAdapter):
    module_types = (BatchNormPart,)


_LAST = {F.layer_norm: LayerNormPart, torch.layer_norm: LayerNormPart, F.rms_norm: RMSNormPart, torch.rms_norm: RMSNormPart}


class NormRule(OpRule):
    funcs = (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm, F.group_norm, torch.group_norm,
             F.batch_norm, torch.batch_norm)

    def capture(self, call: OpCall) -> Any:
        f = call.func
        x = call.arg(0, "input")
        if f in (F.batch_norm, torch.batch_norm):
            if f is F.batch_norm:
                names = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            else:
                names = ("weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
            a = {n: call.arg(i + 1, n) for i, n in enumerate(names)}
        elif f in (F.group_norm, torch.group_norm):
            a = {n: call.arg(i + 1, n) for i, n in enumerate(("num_groups", "weight", "bias", "eps"))}
        elif f in (F.rms_norm, torch.rms_norm):
            a = {n: call.arg(i + 1, n) for i, n in enumerate(("normalized_shape", "weight", "eps"))}
        else:
            a = {n: call.arg(i + 1, n) for i, n in enumerate(("normalized_shape", "weight", "bias", "eps"))}
        wu, bu = call.param(a.get("weight")), call.param(a.get("bias"))
        uses = [u for u in (wu, bu) if u is not None]
        if not uses or any(u.kind != "same" for u in uses):
            return NOT_COVERED
        first, name, label = uses[0], part_name(call.op, uses), call.label(uses)
        w, b = (wu.param if wu else None), (bu.param if bu else None)
        if f in _LAST:
            eps = a.get("eps")
            if eps is None and _LAST[f] is LayerNormPart:
                eps = 1e-5
            part = _LAST[f](first.owner, name, w, b, a["normalized_shape"], eps, label=label)
            y = call.func(*call.args, **call.kwargs)
            if x.ndim == len(part.normalized_shape):  # unbatched
                call.record(part, x, y)
                return y
            L = call.layout(x)
            if not L.known or L.dim >= x.ndim - len(part.normalized_shape):
                call.unknown_batch(uses, "input", L)
            yc = per_sample(y, L)
            call.record(part, per_sample(x, L), yc)
            return restore(yc, L)
        eps = a.get("eps")
        eps = 1e-5 if eps is None else eps
        if f in (F.group_norm, torch.group_norm):
            part = GroupNormPart(first.owner, name, w, b, a["num_groups"], eps, label=label)
        else:
            part = BatchNormPart(first.owner, name, w, b, a["running_mean"], a["running_var"],
                                 bool(a.get("training") or False), eps, label=label)
        call.samples_first(uses, x)
        y = call.func(*call.args, **call.kwargs)
        call.record(part, x, y)
        return y


__all__ = [
    "LayerNormPart", "RMSNormPart", "GroupNormPart", "BatchNormPart", "LayerNormPartAdapter",
    "RMSNormPartAdapter", "GroupNormPartAdapter", "BatchNormPartAdapter", "NormRule",
]
