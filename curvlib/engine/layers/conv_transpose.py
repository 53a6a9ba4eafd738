"""Transposed convolutions ``ConvTranspose1d/2d/3d``, incl. grouped / depthwise ones.

``y[o] = sum_{i, k: o = i*stride - pad + k*dil} W[:, :, k]^T x[i]``, hence for weight
``[C_in, C_out, *k]`` viewed as ``[C_in, C_out * prod(k)]``:

    dW_n = sum_i x_{n,i} unfold(g_n)_i^T      (i runs over *input* positions)

where ``unfold`` extracts output-gradient patches with the layer's own kernel size,
stride, padding and dilation. So the activation side is the *left* factor here: in
``p.kfac = [G, A]`` the first factor (``C_in x C_in``) comes from the layer inputs and the
second (``C_out*prod(k)`` squared) from the output gradients, which keeps
``torch.kron(G, A)`` the curvature block of ``p.flatten()``. The bias gradient sums the
output gradient over output positions.

Grouped (``groups = B > 1``): group ``b`` maps input channels ``[b C_in/B, (b+1) C_in/B)`` to
output channels ``[b C_out/B, (b+1) C_out/B)`` with the weight rows ``[b C_in/B, (b+1) C_in/B)``
(weight ``[C_in, C_out/B, *k]``). Both sides are channel-major, so group ``b`` owns the slices
``b`` of ``a`` (``C_in/B`` entries) and of the output-gradient patches (``C_out/B prod(k)``):
KFAC gives the block form ``p.kfac = [A [B, n, n], G [B, m, m]]`` (activation side first, as for
``groups = 1``), each pair that of the group as a separate transposed convolution, and the
per-sample gradients are ``X_n[b] = sum_i x_{n,i,b} unfold(g_n)_{i,b}^T`` (one batched einsum),
which the exact extensions use (cross-group terms included). The bias keeps its dense ``[G]``.
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.conv import grouped_per_sample, unbatched
from curvlib.engine.unfold import unfold


class ConvTransposeAdapter(LayerAdapter):
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    act_side = "left"

    def blocks(self, module: nn.Module) -> int:
        return module.groups

    def per_sample_weight(self, module: nn.Module, s: Tensor, x: Tensor, out: Tensor):
        if module.groups == 1:
            return None
        return grouped_per_sample(s, self.activations(module, x), module.groups, "left", out)

    def check(self, module: nn.Module) -> None:
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"curvlib: {module} uses padding_mode={module.padding_mode!r}; "
                "transposed convolutions support only 'zeros'."
            )

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return 1 if unbatched(module, x) else x.shape[0]

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        if unbatched(module, x):
            x = x.unsqueeze(0)
        return rearrange(x, "n c ... -> n (...) c")

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if unbatched(module, x):
            g, x = g.unsqueeze(1), x.unsqueeze(0)
        K, N = g.shape[:2]
        pad = tuple(p for p in reversed(module.padding) for _ in range(2))
        g = F.pad(g.flatten(0, 1), pad)
        # output_padding may leave trailing outputs that no input position reaches
        crop = tuple(
            slice(0, (i - 1) * s + dil * (k - 1) + 1)
            for i, s, dil, k in zip(
                x.shape[2:], module.stride, module.dilation, module.kernel_size
            )
        )
        patches = unfold(
            g[(slice(None), slice(None)) + crop],
            module.kernel_size,
            module.stride,
            module.dilation,
            (),
        )
        return rearrange(patches, "(k n) t d -> k n t d", k=K, n=N)

    def bias_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if unbatched(module, x):
            g = g.unsqueeze(1)
        return rearrange(g, "k n c ... -> k n (...) c")
