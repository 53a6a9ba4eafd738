"""Rule: a parameter broadcast over the samples by an elementwise operation (a scale or a shift).

``w * x + b`` (LlamaRMSNorm's ``self.weight * hidden_states``, a learned bias or layer scale, a
position table ``x + self.pos [1, T, D]``, ViT's ``self.cls_token.expand(N, -1, -1)``): in
``add``, ``sub``, ``mul``, ``div``, ``where`` (functions, methods, operators, in-place on the other
operand) or an ``expand`` whose output has the samples in a dimension where the parameter has size
1, the rule runs the operation on the parameter expanded to the output's shape, ``P_b``, and
records ``P_b`` (per-sample view, :mod:`~curvlib.engine.layers.batch_layout`) as the output of a
:class:`BroadcastPart`. The cotangent of ``P_b`` at sample ``n`` is the operation's gradient w.r.t.
``P`` from that sample before the sum over the broadcast, so

    dP_n = sum_t c_{n,t}      (t: the positions ``P`` is broadcast over, c the cotangent of P_b)

exactly, for any elementwise operation (``g * x`` for a scale, ``g`` for a shift, ``-g x / w^2``
for a division). The parameter is *summed* (as a bias, :attr:`LayerAdapter.summed_params`):
every extension gives its exact block ``p.kfac = [G]`` (``numel x numel``), per-sample gradients
and diagonals. All broadcast uses of one parameter in one forward are one part, called several
times (positions). Values are unchanged (``P_b`` is a view).
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import Tensor

from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.batch_layout import Layout, per_sample, per_sample_shape, restore
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, OpRule, ParamUse
from curvlib.engine.layers.parts import Part

_TB = torch._C.TensorBase

_BINARY = (
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.rsub, torch.subtract,
    torch.multiply, torch.divide,
    _TB.add, _TB.sub, _TB.mul, _TB.div, _TB.true_divide, _TB.subtract, _TB.multiply, _TB.divide,
    torch.Tensor.__rsub__, torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__,
)
_INPLACE = (_TB.add_, _TB.sub_, _TB.mul_, _TB.div_, _TB.__iadd__, _TB.__isub__, _TB.__imul__, torch.Tensor.__itruediv__)
_WHERE = (torch.where, _TB.where)
_EXPAND = (_TB.expand, _TB.expand_as)


class BroadcastPart(Part):
    """A parameter broadcast over the samples (module docstring).

    Attributes:
        shape: the per-sample view's shape of the parameter aligned to the operation's output
            (``1`` where it is broadcast): its dimensions above 1 hold its entries, in order.
    """

    def __init__(self, owner, name, weight, shape: Tuple[int, ...], label=None):
        super().__init__(owner, name, weight, None, label)
        self.shape = shape


class BroadcastAdapter(LayerAdapter):
    """:class:`BroadcastPart`: one summed parameter; the recorded input is a stand-in ``[N]``."""

    module_types = (BroadcastPart,)
    summed_params = ("weight",)

    def activations(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError(
            f"curvlib: {module} has no activation side (a parameter broadcast over the samples); "
            "this extension needs a Kronecker-factored weight. It gets exact blocks [G] from KFAC, "
            "ExactBlockFisher, DiagGGN, GGNMP and BatchGrad."
        )

    def weight_cotangents(self, module, g: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError(f"curvlib: {module}: the parameter is summed (summed_params).")

    def param_cotangents(self, module, name: str, g: Tensor, x: Tensor) -> Tensor:
        """``g [K, N, *rest]`` (the cotangents of the per-sample view of ``P_b``) ->
        ``[K, N, T, numel]``: the broadcast dimensions as positions, the parameter's last."""
        shape = module.shape
        pos = [i + 1 for i in range(1, len(shape)) if shape[i] == 1]
        ent = [i + 1 for i in range(1, len(shape)) if shape[i] > 1]
        v = g.permute(0, 1, *pos, *ent)
        return v.reshape(g.shape[0], g.shape[1], -1, module.weight.numel())


def _stand_in(p: Tensor, N: int) -> Tensor:
    """The recorded input: ``[N]`` zeros of one stored number (only ``N`` is read)."""
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(N)


class BroadcastRule(OpRule):
    funcs = _BINARY + _INPLACE + _WHERE + _EXPAND

    def capture(self, call: OpCall) -> Any:
        if call.func in _EXPAND:
            return self._expand(call)
        args = list(call.args)
        slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        uses = [(i, call.param(args[i])) for i in slots]
        mine = [(i, u) for i, u in uses if u is not None]
        if len(mine) != 1 or mine[0][1].kind not in ("same", "reshaped"):
            return NOT_COVERED
        i, u = mine[0]
        if call.func in _INPLACE and i == 0:
            return NOT_COVERED
        others = [args[j] for j in slots if j != i]
        shapes = [t.shape for t in others] + [u.tensor.shape]
        try:
            out = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return NOT_COVERED
        L = self._samples(call, others, out)
        if L is None:
            return NOT_COVERED
        aligned = (1,) * (len(out) - u.tensor.ndim) + tuple(u.tensor.shape)
        if aligned[L.dim] != 1:
            return NOT_COVERED  # the parameter is not broadcast over the samples
        Pc = per_sample(u.tensor.expand(out), L)
        self._record(call, u, Pc, aligned, L)
        args[i] = restore(Pc, L)
        return call.func(*args, **call.kwargs)

    def _samples(self, call: OpCall, others: List[Tensor], out) -> Any:
        """The layout of the operation's output: that of an operand of the output's shape."""
        for t in others:
            if t.ndim != len(out) or call.param(t) is not None:
                continue
            L = call.layout(t)
            if not L.known:
                continue
            if t.shape[L.dim] == out[L.dim]:
                return L
        for t in others:  # the only batched operand has an unknown layout: refuse, naming it
            if t.ndim == len(out) and call.param(t) is None and not call.layout(t).known:
                call.unknown_batch([], "operand", call.layout(t))
        return None

    def _expand(self, call: OpCall) -> Any:
        u = call.param(call.args[0])
        if u is None or u.kind not in ("same", "reshaped"):
            return NOT_COVERED
        y = call.func(*call.args, **call.kwargs)
        if y.ndim == 0:
            return NOT_COVERED
        aligned = (1,) * (y.ndim - u.tensor.ndim) + tuple(u.tensor.shape)
        if aligned[0] != 1 or y.shape[0] == 1 and aligned == tuple(y.shape):
            return NOT_COVERED  # no new samples' dimension
        self._record(call, u, y, aligned, Layout(0, y.shape[0], 1))
        return y

    def _record(self, call: OpCall, u: ParamUse, Pc: Tensor, aligned, L: Layout) -> None:
        part = BroadcastPart(u.owner, f"broadcast({u.name})", u.param, per_sample_shape(aligned, L),
                             label=f"'{u.name}' broadcast over the samples")
        call.record(part, _stand_in(u.param, L.samples), Pc)


__all__ = ["BroadcastPart", "BroadcastAdapter", "BroadcastRule"]
