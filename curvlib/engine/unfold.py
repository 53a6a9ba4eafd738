"""Patch extraction (im2col) for N-d convolutions.

``unfold(x)[n, t, :]`` is the receptive field of output position ``t`` flattened as
``(c_in, k_1, ..., k_d)``, so that ``conv(x, W)[n, :, t] = W.flatten(1) @ unfold(x)[n, t]``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def _spatial_names(prefix: str, d: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(d))


def unfold(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad: Tuple[int, ...],
    padding_mode: str = "zeros",
) -> Tensor:
    """Extract convolution patches.

    Args:
        x: ``[B, C, *S]`` input with ``d = len(kernel_size)`` spatial dimensions.
        kernel_size, stride, dilation: per spatial dimension.
        pad: padding in ``F.pad`` order (last dimension first, ``(left, right)`` pairs).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``[B, T, C * prod(kernel_size)]`` patches, ``T = prod(output spatial size)``.
    """
    d = len(kernel_size)
    if pad and any(pad):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, pad, mode=mode)
    # sliding windows along each spatial dim: [B, C, O_1..O_d, W_1..W_d]
    for i, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
    if any(dil != 1 for dil in dilation):
        x = x[(...,) + tuple(slice(None, None, dil) for dil in dilation)]
    o, k = _spatial_names("o", d), _spatial_names("k", d)
    return rearrange(x, f"b c {o} {k} -> b ({o}) (c {k})")
