"""Independent references for the tests: dense quantities from ``torch.func``."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap


def per_sample_grads(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """``[N, *p.shape]`` gradients of ``loss_fn(model(x_n), y_n)`` (unscaled, one sample)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xn, yn):
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0))

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The exact GGN ``J^T H J`` of ``loss_fn(model(x), y)`` over all parameters (flattened
    in ``model.parameters()`` order), from ``torch.func`` Jacobians and Hessians."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = functional_call(model, params, (x,))
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.reshape(out.numel(), -1) for j in J.values()], dim=1)
    H = hessian(lambda o: loss_fn(o, y))(out.detach()).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def param_slices(model: nn.Module) -> List[slice]:
    out, i = [], 0
    for p in model.parameters():
        out.append(slice(i, i + p.numel()))
        i += p.numel()
    return out
