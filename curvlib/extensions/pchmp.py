r"""PCHMP: positive-curvature Hessian block products (Chen et al. 2019, "BDA-PCH"), natively.

The Hessian block of a parameter ``θ_l`` (all other parameters fixed) is

    H_ll = J_l^T H_{z_l} J_l,      H_{x} = J^T H_{y} J + diag(φ''(x) ⊙ δ_y)   at y = φ(x)

(Hessian back-propagation, Dangel et al. 2020): linear and piecewise-linear operations
(``linear``, convolutions, pooling, ReLU, flatten, additions) pass the Hessian on through their
Jacobian, and each elementwise activation ``φ`` adds its residual ``φ''(x) ⊙ δ``, ``δ`` the
gradient of the objective with respect to its output. The PCH replaces that residual by
``|φ''(x) ⊙ δ|`` (``modify="abs"``) or ``max(φ''(x) ⊙ δ, 0)`` (``"clip"``), which makes every
block positive semi-definite (the loss Hessian of cross-entropy / MSE is PSD). This equals
BackPACK's ``PCHMP(modify=...)`` (tested against it) and needs no sequential model.

How: :class:`HMP`'s re-run of the objective, with every activation call replaced (through a
``TorchFunctionMode``, only during that re-run) by an autograd function whose *double*
backward uses the modified residual; every block product is then one double backward, as for
the Hessian. Operations outside a known list (module constant :data:`LINEAR_OPS`) raise
``NotImplementedError`` naming the operation: their second-order terms are unknown, and a
silently wrong PCH is worse than none.

BackPACK 1.7.1's ``PCHMP`` weights the residual by ``δ ⊙ δ`` instead of ``δ`` (a double
multiplication in ``PCHMPBase.modified_residual_mat_prod``); ``convention="backpack"`` reproduces
it exactly, the default ``"paper"`` follows Chen et al.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

from curvlib.extensions.hmp import HMP, HessianGraph
from curvlib.extensions.operator import ParameterOperator

MODIFY = ("abs", "clip")
CONVENTIONS = ("paper", "backpack")


def _sigmoid_d(x: Tensor) -> Tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    d1 = s * (1 - s)
    return d1, d1 * (1 - 2 * s)


def _tanh_d(x: Tensor) -> Tuple[Tensor, Tensor]:
    t = torch.tanh(x)
    d1 = 1 - t * t
    return d1, -2 * t * d1


#: elementwise activations: ``x -> (φ'(x), φ''(x))``
ACTIVATIONS: Dict[Any, Tuple[Callable, Callable]] = {
    torch.sigmoid: (torch.sigmoid, _sigmoid_d),
    Tensor.sigmoid: (torch.sigmoid, _sigmoid_d),
    torch.tanh: (torch.tanh, _tanh_d),
    Tensor.tanh: (torch.tanh, _tanh_d),
}

#: operations with no second-order residual on a parameter block: linear (for fixed other
#: parameters) or piecewise linear in their input, shape operations, PSD losses
LINEAR_OPS = {
    F.linear, torch._C._nn.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.relu, torch.relu, Tensor.relu, F.leaky_relu, F.pad, F.dropout,
    torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape, Tensor.permute, Tensor.transpose,
    Tensor.unsqueeze, Tensor.squeeze, Tensor.contiguous, Tensor.__getitem__, torch.cat, Tensor.add, torch.add,
    Tensor.__add__, Tensor.__radd__, Tensor.sub, Tensor.__sub__, Tensor.__neg__, Tensor.detach,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.to, Tensor.float, Tensor.double,
    F.cross_entropy, F.mse_loss, F.binary_cross_entropy_with_logits,
}
_SCALAR_MUL = {Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.mul, Tensor.div, Tensor.__truediv__, torch.div}


class _ActBackward(Function):
    """``(x, g) -> φ'(x) g``, whose backward uses the modified residual ``m(φ''(x) g)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g, derivs, modify, backpack):
        return derivs(x)[0] * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, g, derivs, modify, backpack = inputs
        ctx.save_for_backward(x, g)
        ctx.derivs, ctx.modify, ctx.backpack = derivs, modify, backpack

    @staticmethod
    def backward(ctx, u):
        x, g = ctx.saved_tensors
        d1, d2 = ctx.derivs(x)
        r = d2 * g * g if ctx.backpack else d2 * g
        r = r.abs() if ctx.modify == "abs" else r.clamp(min=0)
        return r * u, d1 * u, None, None, None


class _Activation(Function):
    """``y = φ(x)``; backward ``φ'(x) g`` through :class:`_ActBackward`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, fn, derivs, modify, backpack):
        return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fn, derivs, modify, backpack = inputs
        ctx.save_for_backward(x)
        ctx.derivs, ctx.modify, ctx.backpack = derivs, modify, backpack

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _ActBackward.apply(x, g, ctx.derivs, ctx.modify, ctx.backpack), None, None, None, None


class _PCHMode(TorchFunctionMode):
    """Swap activations for their PCH versions; refuse operations with unknown residuals."""

    def __init__(self, modify: str, backpack: bool):
        super().__init__()
        self.modify, self.backpack = modify, backpack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ACTIVATIONS:
            fn, derivs = ACTIVATIONS[func]
            (x,) = args
            return _Activation.apply(x, fn, derivs, self.modify, self.backpack)
        name = getattr(func, "__name__", repr(func))
        if func in LINEAR_OPS or name == "__get__" or not _differentiable(args, kwargs):
            return func(*args, **kwargs)
        if func in _SCALAR_MUL and sum(_differentiable((a,), {}) for a in args) <= 1:
            return func(*args, **kwargs)
        raise NotImplementedError(
            f"curvlib: PCHMP (positive-curvature Hessian) knows the second-derivative terms of "
            f"sigmoid and tanh and of linear / piecewise-linear operations only; the model (or loss) "
            f"calls {getattr(func, '__qualname__', name)}, whose curvature terms it cannot modify. "
            "Use HMP (exact Hessian) or GGNMP, or express the activation with nn.Sigmoid / nn.Tanh."
        )


def _differentiable(args, kwargs) -> bool:
    def any_grad(a) -> bool:
        if isinstance(a, Tensor):
            return a.requires_grad
        if isinstance(a, (list, tuple)):
            return any(any_grad(b) for b in a)
        return False

    return any_grad(list(args)) or any_grad(list(kwargs.values()))


class PCHGraph(HessianGraph):
    """:class:`HessianGraph` whose gradient graph carries the PCH-modified residuals."""

    modify = "abs"
    backpack = False

    def _graph_mode(self):
        return _PCHMode(self.modify, self.backpack)


class PCHMP(HMP):
    """Positive-curvature Hessian block products ``p.pchmp: [V, *p.shape] -> [V, *p.shape]``
    (module docstring), BackPACK's ``PCHMP(modify=...)`` on any network of supported operations.

    Args:
        modify: ``"abs"`` or ``"clip"`` (how the activations' residual terms are made non-negative).
        convention: ``"paper"`` (default): the residual ``m(φ''(x) ⊙ δ)`` of Chen et al., so that
            the PCH equals the Hessian wherever the residuals are non-negative; ``"backpack"``:
            BackPACK 1.7.1's ``PCHMP``, whose residual is ``m(φ''(x) ⊙ δ ⊙ δ)``
            (``PCHMPBase.modified_residual_mat_prod`` multiplies ``hessian_diagonal``, which already
            holds ``φ'' δ``, by ``δ`` again); equal to BackPACK's products to round-off.

    ``p.pchmp(V)`` maps ``V`` of shape ``[B, *p.shape]`` to ``P_pp V`` of shape ``[B, *p.shape]``,
    ``P_pp`` the PSD PCH block of ``p``. Scaling: that of the loss as the user reduced it (mean:
    of the mean over the batch), as for :class:`HMP`. Like :class:`HMP`, it needs the extended
    loss and re-runs the model once (deterministic model). Block products only: :meth:`operator`
    raises (the PCH is defined block by block).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import PCHMP
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(PCHMP(modify="abs")):
        ...     loss_fn(model(x), y).backward()
        >>> model[0].weight.pchmp(torch.randn(5, 3, 4)).shape  # 5 vectors shaped like the weight
        torch.Size([5, 3, 4])
    """

    savefield = "pchmp"

    def __init__(self, modify: str = "clip", convention: str = "paper"):
        super().__init__()
        if modify not in MODIFY:
            raise ValueError(f"curvlib: PCHMP(modify={modify!r}); use one of {MODIFY}.")
        if convention not in CONVENTIONS:
            raise ValueError(f"curvlib: PCHMP(convention={convention!r}); use one of {CONVENTIONS}.")
        self.modify, self.convention = modify, convention
        self.graph_class = type(
            f"PCHGraph_{modify}", (PCHGraph,), {"modify": modify, "backpack": convention == "backpack"}
        )

    def __repr__(self) -> str:
        return f"PCHMP(modify={self.modify!r}, convention={self.convention!r})"

    def operator(self) -> ParameterOperator:
        raise NotImplementedError(
            "curvlib: PCHMP has block products only (the positive-curvature Hessian of Chen et al. is "
            "defined per block); use p.pchmp, or GGNMP().operator() for a whole-network PSD operator."
        )


__all__ = ["PCHMP", "PCHGraph", "ACTIVATIONS", "LINEAR_OPS"]
