"""Linear layers: ``y = x W^T + b`` with input ``[N, *, D_in]``.

All dimensions between the batch and the feature dimension are weight-sharing
positions ``T`` (Eschenhagen et al., 2023, "Kronecker-Factored Approximate Curvature for
Modern Neural Network Architectures").
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter


class LinearAdapter(LayerAdapter):
    positions = True
    module_types = (nn.Linear,)
    act_side = "right"

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return 1 if x.ndim == 1 else x.shape[0]

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.ndim == 1:
            x = x.unsqueeze(0)
        return rearrange(x, "n ... d -> n (...) d")

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if x.ndim == 1:
            g = g.unsqueeze(1)
        return rearrange(g, "k n ... d -> k n (...) d")
