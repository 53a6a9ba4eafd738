"""Normalisation layers with an elementwise affine map ``y = xhat * gamma + beta``:
``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm1d/2d/3d``.

Neither parameter is a matrix product, so there is no activation side: with ``g`` the output
gradient, the per-sample gradients are sums over positions ``t`` (all dimensions not carrying
the parameter) of per-position vectors, as for a bias::

    d gamma_n = sum_t xhat_{n,t} * g_{n,t}        d beta_n = sum_t g_{n,t}

and every extension gives them the *exact* curvature block (``p.kfac = [G]``,
``G = sum_{k,n} x_{k,n} x_{k,n}^T`` of the per-sample gradients ``x``, dense ``[C, C]``; docs/design.md
§2). Exact for the extension's source: KFAC's ``"type-2"`` source shares the loss-Hessian
columns over the loss's own output positions (curvlinops' KFAC convention), so for a loss on
per-position outputs (sequence models) KFAC's ``[G]`` is that estimate, while
``ExactBlockFisher`` / ``GGNMP`` / ``DiagGGN`` give the exact GGN block. KPSVD gives the exact
block as its single term ``[[C]]``; ``KFAC(cross_layer=True)`` refuses these layers. ``xhat`` is recomputed from the captured input with the statistics the forward used:
per sample (LayerNorm, RMSNorm, GroupNorm), the running statistics (BatchNorm in eval mode) or
the batch statistics (BatchNorm in training mode, where the samples are coupled: exact
quantities raise and KFAC warns, see :mod:`curvlib.engine.coupling`).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter


class _NormAdapter(LayerAdapter):
    summed_params = ("weight",)

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError(
            f"curvlib: {module} has no activation side (elementwise scale); this extension "
            "needs a Kronecker-factored weight. Its parameters get exact blocks [G] from KFAC, "
            "ExactBlockFisher, DiagGGN, GGNMP and BatchGrad."
        )

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``xhat`` (the input normalised as in the forward), shape of ``x``."""
        raise NotImplementedError

    def _positions(self, module: nn.Module, v: Tensor) -> Tensor:
        """``[K, *output.shape]`` -> ``[K, N, T, C]`` (``C`` the parameter entries)."""
        raise NotImplementedError

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError(f"curvlib: {module}: the weight is elementwise (summed_params).")

    def param_cotangents(self, module: nn.Module, name: str, g: Tensor, x: Tensor) -> Tensor:
        return self._positions(module, g * self.normalized(module, x).unsqueeze(0))

    def bias_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        return self._positions(module, g)


class _LastDimsAdapter(_NormAdapter):
    """Parameters over the trailing ``normalized_shape`` dimensions (LayerNorm, RMSNorm)."""
    positions = True

    def _dims(self, module: nn.Module):
        return tuple(range(-len(module.normalized_shape), 0))

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return 1 if x.ndim == len(module.normalized_shape) else x.shape[0]

    def _positions(self, module: nn.Module, v: Tensor) -> Tensor:
        nd = len(module.normalized_shape)
        if v.ndim - 1 == nd:  # unbatched input
            v = v.unsqueeze(1)
        v = v.flatten(-nd)  # [K, N, *, C]
        return v.reshape(v.shape[0], v.shape[1], -1, v.shape[-1])


class LayerNormAdapter(_LastDimsAdapter):
    module_types = (nn.LayerNorm,)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        dims = self._dims(module)
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)


class RMSNormAdapter(_LastDimsAdapter):
    module_types = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.square().mean(self._dims(module), keepdim=True) + eps)


class _ChannelAdapter(_NormAdapter):
    """Parameters over the channel dimension 1 of ``[N, C, *]`` (GroupNorm, BatchNorm)."""

    def _positions(self, module: nn.Module, v: Tensor) -> Tensor:
        return rearrange(v, "k n c ... -> k n (...) c")


class GroupNormAdapter(_ChannelAdapter):
    module_types = (nn.GroupNorm,)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        xg = x.reshape(x.shape[0], module.num_groups, -1)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
        return ((xg - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)


class BatchNormAdapter(_ChannelAdapter):
    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def check(self, module: nn.Module) -> None:
        if isinstance(module, nn.SyncBatchNorm):
            raise NotImplementedError(f"curvlib: {module}: SyncBatchNorm is not supported.")

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        use_batch = module.training or module.running_mean is None
        if use_batch:  # the statistics of this batch (samples coupled)
            dims = (0,) + tuple(range(2, x.ndim))
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        else:
            mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)


__all__ = ["LayerNormAdapter", "RMSNormAdapter", "GroupNormAdapter", "BatchNormAdapter"]
