"""Convolutions ``Conv1d/2d/3d`` (groups = 1), any stride, padding (incl. "same"),
dilation and padding mode.

Weight ``[C_out, C_in, *k]`` viewed as ``[C_out, C_in * prod(k)]``; ``a`` = unfolded
input patches (one per output position), ``s`` = output gradient per output position
(Grosse & Martens, 2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers").
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.unfold import unfold


def check_groups(module: nn.Module) -> None:
    if module.groups != 1:
        raise NotImplementedError(
            f"curvlib: {module} has groups={module.groups}; only groups=1 is supported "
            "for convolutions. Replace it by a groups=1 layer or leave it out of extend()."
        )


def unbatched(module: nn.Module, x: Tensor) -> bool:
    """An unbatched input ``[C, *S]`` (which torch's convolutions accept): a batch of one."""
    return x.ndim == len(module.kernel_size) + 1


class ConvAdapter(LayerAdapter):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    act_side = "right"

    def check(self, module: nn.Module) -> None:
        check_groups(module)

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return 1 if unbatched(module, x) else x.shape[0]

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        return unfold(
            x.unsqueeze(0) if unbatched(module, x) else x,
            module.kernel_size,
            module.stride,
            module.dilation,
            module._reversed_padding_repeated_twice,
            module.padding_mode,
        )

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if unbatched(module, x):
            g = g.unsqueeze(1)
        return rearrange(g, "k n c ... -> k n (...) c")
