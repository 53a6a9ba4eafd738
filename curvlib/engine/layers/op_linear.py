"""Rule: a 2-D parameter in a matrix product -- ``F.linear``, ``addmm``, ``matmul`` / ``mm`` / ``@``.

Wherever the product runs (HF ``Conv1D``: ``addmm(b, x.view(-1, D), W)`` with ``W [in, out]``;
``x @ self.W``; ``self.W @ x``; functional code), the call is recorded as a Linear over positions
on per-sample views of its input and output (:mod:`curvlib.engine.layers.batch_layout`), so its
per-sample gradient is exactly ``sum_t s_t a_t^T`` (Eschenhagen et al. 2023 for the positions):

- ``y = x M`` with ``M = W^T`` (``F.linear(x, W, b)``, ``x @ W.T``, ``W @ x`` read on the
  transposed views ``x^T``, ``y^T``): :class:`LinearPart`, ``W [out, in]``, activation side right,
  ``p.kfac = [G, A]`` as ``nn.Linear``;
- ``y = x M`` with ``M = W`` (``x @ W``, ``addmm(b, x, W)``, ``F.linear(x, W.T)``): :class:`MatmulPart`,
  ``W [in, out]``, activation side left (docs/design.md §2): ``p.kfac = [A, G]``, so that
  ``kron(A, G)`` is the block of ``W.flatten()`` -- the twin ``nn.Linear``'s factors, swapped.

A bias (``F.linear``'s, ``addmm``'s ``input`` of ``out`` entries) is the part's bias. Not covered
(a warning names the parameter if it reaches the loss): ``addmm`` with ``beta`` / ``alpha`` other
than 1, two parameters multiplied, a parameter that is not 2-D, a bias of another shape.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlib.engine.layers.batch_layout import per_sample, permuted, restore
from curvlib.engine.layers.linear import LinearAdapter
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, OpRule, ParamUse, part_name
from curvlib.engine.layers.parts import Part

_TB = torch._C.TensorBase


class LinearPart(Part):
    """A parameter ``W [out, in]`` applied as ``y = x W^T (+ b)``."""


class MatmulPart(Part):
    """A parameter ``W [in, out]`` applied as ``y = x W (+ b)``."""


class LinearPartAdapter(LinearAdapter):
    module_types = (LinearPart,)


class MatmulPartAdapter(LinearAdapter):
    """``W`` is ``[D_a, D_s]``: the activation side is the left factor (``p.kfac = [A, G]``)."""

    module_types = (MatmulPart,)
    act_side = "left"


_ADDMM = (torch.addmm, _TB.addmm)
_MATMUL = (torch.matmul, _TB.matmul, _TB.__matmul__, torch.mm, _TB.mm)


class MatmulRule(OpRule):
    funcs = (F.linear,) + _ADDMM + _MATMUL + (torch.Tensor.__rmatmul__,)

    def capture(self, call: OpCall) -> Any:
        f = call.func
        if f is F.linear:
            x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
            wu = call.param(w)
            if wu is not None and wu.kind not in ("same", "T"):
                return NOT_COVERED
            # F.linear(x, W) = x W^T: the parameter's transpose is the product's matrix for "same"
            return self._product(call, x, wu, transposed=wu is None or wu.kind == "same", bias=b, left=False)
        if f in _ADDMM:
            if call.kwargs.get("beta", 1) != 1 or call.kwargs.get("alpha", 1) != 1:
                return NOT_COVERED
            b, a, m = call.arg(0, "input"), call.arg(1, "mat1"), call.arg(2, "mat2")
        elif f is torch.Tensor.__rmatmul__:
            m, a, b = call.args[0], call.args[1], None
        else:
            a, m, b = call.arg(0, "input"), call.arg(1, "other"), None
        au, mu = call.param(a), call.param(m)
        if (au is None) == (mu is None):
            return NOT_COVERED  # two parameters multiplied (or none: the bias alone, below)
        use = mu or au
        if use.kind not in ("same", "T") or use.param.ndim != 2:
            return NOT_COVERED
        if mu is not None:  # x @ M: M = W ("same") or W^T ("T")
            return self._product(call, a, mu, transposed=mu.kind == "T", bias=b, left=False)
        if b is not None and call.param(b) is not None:
            return NOT_COVERED  # W x + b with a bias over columns: not a bias of the product's rows
        # M x, read on the transposes: x^T M^T, M^T = W^T ("same") or W ("T")
        return self._product(call, m, au, transposed=au.kind == "same", bias=None, left=True)

    def _product(self, call: OpCall, x: Any, wu: Optional[ParamUse], transposed: bool, bias: Any, left: bool):
        """``y = x M (+ b)`` (``left``: ``y^T = x^T M^T``, ``x`` the right operand), ``M`` the
        parameter's transpose (``transposed``) or itself."""
        if not isinstance(x, Tensor):
            return NOT_COVERED
        bu = call.param(bias) if isinstance(bias, Tensor) else None
        uses = [u for u in (wu, bu) if u is not None]
        if not uses:
            return NOT_COVERED
        if bu is not None:
            out = wu.param.shape[0 if transposed else 1] if wu is not None else bu.tensor.shape[-1]
            if bu.kind not in ("same", "reshaped") or bu.param.numel() != out or bu.tensor.shape[-1] != out:
                return NOT_COVERED
        y = call.func(*call.args, **call.kwargs)
        cls = LinearPart if transposed else MatmulPart
        first = uses[0]
        part = cls(first.owner, part_name(call.op, uses), wu.param if wu else None, bu.param if bu else None,
                   label=call.label(uses))
        if x.ndim == 1:  # unbatched: one sample (LinearAdapter reads a 1-D input so)
            call.record(part, x, y)
            return y
        xs, ys = (x.mT, y.mT) if left else (x, y)
        L = call.layout(x)
        if left:
            L = permuted(L, list(range(x.ndim - 2)) + [x.ndim - 1, x.ndim - 2])
        if not L.known or L.dim >= xs.ndim - 1:
            call.unknown_batch(uses, "input", L)
        yc = per_sample(ys, L)
        call.record(part, per_sample(xs, L), yc)
        out = restore(yc, L)
        return out.mT if left else out


__all__ = ["LinearPart", "MatmulPart", "LinearPartAdapter", "MatmulPartAdapter", "MatmulRule"]
