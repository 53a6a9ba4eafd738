"""Rule: a parameter as the weight (and bias) of ``F.conv1d/2d/3d`` or ``F.conv_transpose1d/2d/3d``.

The call is recorded as a :class:`ConvPart` / :class:`ConvTransposePart`, an object with the
attributes of the ``nn.Conv*`` / ``nn.ConvTranspose*`` module that would make the same call
(``kernel_size``, ``stride``, ``padding`` incl. ``"same"`` / ``"valid"``, ``dilation``,
``groups``, ``output_padding``), so the adapters of :mod:`~curvlib.engine.layers.conv` and
:mod:`~curvlib.engine.layers.conv_transpose` describe it unchanged: every extension gives a
functional convolution exactly what it gives the module (grouped ones in the block form).
The samples must be the convolution's batch dimension 0 (a convolution's batch that merges
several rows per sample, e.g. video frames ``[N F, C, H, W]``, is refused naming the parameter).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F

from curvlib.engine.layers.conv import ConvAdapter
from curvlib.engine.layers.conv_transpose import ConvTransposeAdapter
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, OpRule, part_name
from curvlib.engine.layers.parts import Part

#: F.conv*: (spatial dims, transposed)
_CONVS = {
    F.conv1d: (1, False), F.conv2d: (2, False), F.conv3d: (3, False),
    F.conv_transpose1d: (1, True), F.conv_transpose2d: (2, True), F.conv_transpose3d: (3, True),
}


def _tuple(v: Any, d: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * d


class ConvPart(Part):
    """The weight ``[C_out, C_in / groups, *k]`` (and bias) of a functional convolution, with the
    attributes of the equivalent ``nn.ConvNd`` (module docstring)."""

    padding_mode = "zeros"

    def __init__(self, owner, name, weight, bias, stride, padding, dilation, groups, output_padding=0, label=None):
        super().__init__(owner, name, weight, bias, label)
        d = weight.ndim - 2
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.dilation = _tuple(stride, d), _tuple(dilation, d)
        self.groups = int(groups)
        self.output_padding = _tuple(output_padding, d)
        if isinstance(padding, str):  # as nn.ConvNd: "valid" = 0, "same" = the total d (k - 1)
            total = [0 if padding == "valid" else dil * (k - 1) for dil, k in zip(self.dilation, self.kernel_size)]
            self.padding = padding
            rev = []
            for t in reversed(total):
                rev += [t // 2, t - t // 2]
        else:
            self.padding = _tuple(padding, d)
            rev = [p for p in reversed(self.padding) for _ in range(2)]
        self._reversed_padding_repeated_twice = rev


class ConvTransposePart(ConvPart):
    """The weight ``[C_in, C_out / groups, *k]`` (and bias) of a functional transposed convolution."""


class ConvPartAdapter(ConvAdapter):
    module_types = (ConvPart,)


class ConvTransposePartAdapter(ConvTransposeAdapter):
    module_types = (ConvTransposePart,)


class ConvRule(OpRule):
    funcs = tuple(_CONVS)

    def capture(self, call: OpCall) -> Any:
        d, transposed = _CONVS[call.func]
        x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
        wu, bu = call.param(w), call.param(b)
        if wu is not None and wu.kind != "same" or bu is not None and bu.kind != "same":
            return NOT_COVERED
        if wu is None:
            return NOT_COVERED  # a bias alone (weight not a parameter of the capture): not described
        uses = [u for u in (wu, bu) if u is not None]
        if transposed:
            stride, padding, output_padding = call.arg(3, "stride", 1), call.arg(4, "padding", 0), call.arg(5, "output_padding", 0)
            groups, dilation = call.arg(6, "groups", 1), call.arg(7, "dilation", 1)
            part = ConvTransposePart(wu.owner, part_name(call.op, uses), wu.param, bu.param if bu else None,
                                     stride, padding, dilation, groups, output_padding, label=call.label(uses))
            ConvTransposePartAdapter().check(part)
        else:
            stride, padding = call.arg(3, "stride", 1), call.arg(4, "padding", 0)
            dilation, groups = call.arg(5, "dilation", 1), call.arg(6, "groups", 1)
            part = ConvPart(wu.owner, part_name(call.op, uses), wu.param, bu.param if bu else None,
                            stride, padding, dilation, groups, label=call.label(uses))
        if x.ndim == d + 2:  # batched: the samples must be the convolution's batch
            call.samples_first(uses, x)
        y = call.func(*call.args, **call.kwargs)
        call.record(part, x, y)
        return y


__all__ = ["ConvPart", "ConvTransposePart", "ConvPartAdapter", "ConvTransposePartAdapter", "ConvRule"]
