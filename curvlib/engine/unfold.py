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
        ``[B, T, C * prod(kernel_size)]`` patches, ``T = prod(output spatial size)``, as a
        transposed view of a contiguous ``[B, C * prod(kernel_size), T]`` tensor (so that
        ``sum_t a a^T`` is a batched matmul without another copy).
    """
    d = len(kernel_size)
    if d == 2 and padding_mode == "zeros" and _symmetric(pad):
        # ATen's im2col: [B, C*k1*k2, T]; returned as a transposed view (no copy)
        padding = (pad[2], pad[0]) if pad else (0, 0)
        return F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2)
    if pad and any(pad):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, pad, mode=mode)
    # sliding windows along each spatial dim: [B, C, O_1..O_d, W_1..W_d]
    for i, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
    if any(dil != 1 for dil in dilation):
        x = x[(...,) + tuple(slice(None, None, dil) for dil in dilation)]
    o, k = _spatial_names("o", d), _spatial_names("k", d)
    # channel-major copy, returned as a transposed view like the 2d path
    return rearrange(x, f"b c {o} {k} -> b (c {k}) ({o})").transpose(1, 2)


def _symmetric(pad: Tuple[int, ...]) -> bool:
    return not pad or all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2))
