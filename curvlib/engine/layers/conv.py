"""Convolutions ``Conv1d/2d/3d``, any stride, padding (incl. "same"), dilation, padding
mode and ``groups``.

Grouped / depthwise convolutions (``groups = B > 1``): group ``b`` maps input channels
``[b C_in/B, (b+1) C_in/B)`` to output channels ``[b C_out/B, (b+1) C_out/B)`` with weight rows
``[b C_out/B, (b+1) C_out/B)``; the unfolded patches are channel-major, so its activation
entries are the contiguous slice ``[b n, (b+1) n)``, ``n = C_in/B prod(k)``. KFAC gives the
block form ``p.kfac = [G [B, m, m], A [B, n, n]]``, each pair that of the group as a separate
convolution; per-sample gradients are ``X_n[b] = sum_t s_{n,t,b} a_{n,t,b}^T`` (one batched
einsum), and the exact extensions use them (cross-group terms included).

Weight ``[C_out, C_in, *k]`` viewed as ``[C_out, C_in * prod(k)]``; ``a`` = unfolded
input patches (one per output position), ``s`` = output gradient per output position
(Grosse & Martens, 2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers").
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.conv_gram import shift_cost, shift_gram
from curvlib.engine.unfold import unfold


def grouped_per_sample(s: Tensor, a: Tensor, B: int, act_side: str, out: Tensor) -> Tensor:
    """Per-sample gradients of a grouped weight written to ``out``: ``X_{k,n}[b] = sum_t
    s_{k,n,t,b} a_{n,t,b}^T`` (``act_side="right"``, weight rows ``[B m, n]``) or its transpose
    ``sum_t a s^T`` (``"left"``, rows ``[B n, m]``), one batched einsum; ``s [K, N, T, B m]``,
    ``a [N, T, B n]`` in the grouped layout (slice ``b`` of the last dimension is group ``b``)."""
    eq = "kntbo,ntbi->knboi" if act_side == "right" else "kntbo,ntbi->knbio"
    X = torch.einsum(
        eq,
        rearrange(s, "k n t (b o) -> k n t b o", b=B),
        rearrange(a, "n t (b i) -> n t b i", b=B),
    )
    out.view(X.shape).copy_(X)
    return out


def unbatched(module: nn.Module, x: Tensor) -> bool:
    """An unbatched input ``[C, *S]`` (which torch's convolutions accept): a batch of one."""
    return x.ndim == len(module.kernel_size) + 1


#: :meth:`ConvAdapter.act_gram` takes the shift correlations (no patches) for convolutions with
#: at least this many input channels (fewer: the weight-gradient kernels are inefficient for
#: one channel; 3x3, batch 64, 1 thread: 1 channel on 28x28 1.0 ms against 0.7 ms unfolded,
#: 3 channels on 32x32 1.9 ms against 2.9 ms, 16 on 14x14 2.1 against 12 ms loaded)
SHIFT_MIN_CHANNELS = 3
#: ... and at most this :func:`shift_cost` (few positions: the border terms dominate)
SHIFT_MAX_COST = 0.6

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def zero_padded(module: nn.Module, x: Tensor) -> Tuple[Tensor, List[int]]:
    """``(x, padding)`` for running ``module``'s convolution kernels on ``x [N, C, *L]`` with
    symmetric zero ``padding`` per dimension: the module's own padding where it is that, else
    (``padding_mode`` reflect / replicate / circular, asymmetric ``"same"``) ``x`` padded once
    here and ``padding`` zero."""
    d = len(module.kernel_size)
    pad = module._reversed_padding_repeated_twice  # last dimension first
    if module.padding_mode == "zeros" and all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2)):
        return x, [pad[2 * (d - 1 - i)] for i in range(d)]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return (F.pad(x, pad, mode=mode) if any(pad) else x), [0] * d


def output_size(module: nn.Module, spatial: Sequence[int], padding: Sequence[int]) -> List[int]:
    """The output positions per dimension of ``module`` on inputs of size ``spatial`` with the total
    padding ``padding`` per dimension (both sides)."""
    return [
        (L + P - dil * (k - 1) - 1) // st + 1
        for L, P, dil, k, st in zip(spatial, padding, module.dilation, module.kernel_size, module.stride)
    ]


class ConvWeightMap:
    """``V -> conv(x; V)`` and its transpose with the convolution kernels (no unfolded patches);
    see :class:`~curvlib.engine.layers.base.WeightMap`. ``B`` weights go as one convolution with
    ``B C_out`` output channels, and their gradients as one ``convolution_backward``.

    Padding other than symmetric zeros (``padding_mode`` reflect / replicate / circular,
    asymmetric ``"same"``) is applied to ``x`` once here, the convolutions then run unpadded.
    """

    def __init__(self, module: nn.Module, x: Tensor):
        self.x, self.padding = zero_padded(module, x)
        self.stride, self.dilation = list(module.stride), list(module.dilation)
        self.shape = tuple(module.weight.shape)
        self.conv = _CONV[len(module.kernel_size)]
        self.out_spatial = tuple(output_size(module, self.x.shape[2:], [2 * p for p in self.padding]))

    def forward(self, V: Tensor) -> Tensor:
        B, N = V.shape[0], self.x.shape[0]
        W = V.reshape(B * self.shape[0], *self.shape[1:])
        y = self.conv(self.x, W, None, self.stride, self.padding, self.dilation)  # [N, B C_out, *S]
        return y.view(N, B, -1)

    def backward(self, U: Tensor) -> Tensor:
        N, B = U.shape[:2]
        g = U.reshape(N, B * self.shape[0], *self.out_spatial)
        w = U.new_empty(()).expand(B * self.shape[0], *self.shape[1:])  # only its shape is read
        gw = torch.ops.aten.convolution_backward(
            g, self.x, w, None, self.stride, self.padding, self.dilation, False,
            [0] * len(self.stride), 1, [False, True, False],
        )[1]
        return gw.view(B, *self.shape)


class ConvAdapter(LayerAdapter):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    act_side = "right"

    def blocks(self, module: nn.Module) -> int:
        return module.groups

    def per_sample_weight(self, module: nn.Module, s: Tensor, x: Tensor, out: Tensor):
        if module.groups == 1:
            return None
        return grouped_per_sample(s, self.activations(module, x), module.groups, "right", out)

    def weight_map(self, module: nn.Module, x: Tensor) -> Optional[ConvWeightMap]:
        if module.groups != 1 or unbatched(module, x):
            return None
        return ConvWeightMap(module, x)

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return 1 if unbatched(module, x) else x.shape[0]

    def act_count(self, module: nn.Module, x: Tensor) -> int:
        """``N T`` (output positions per sample ``T``) without unfolding."""
        d = len(module.kernel_size)
        pad = module._reversed_padding_repeated_twice  # last dimension first
        total = [pad[2 * (d - 1 - i)] + pad[2 * (d - 1 - i) + 1] for i in range(d)]
        return self.batch_size(module, x) * math.prod(output_size(module, x.shape[x.ndim - d:], total))

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        return unfold(
            x.unsqueeze(0) if unbatched(module, x) else x,
            module.kernel_size,
            module.stride,
            module.dilation,
            module._reversed_padding_repeated_twice,
            module.padding_mode,
        )

    def act_gram(self, module: nn.Module, x: Tensor, act: Callable[[], Tensor]) -> Optional[Tensor]:
        """``sum_{n,t} a a^T`` without a matrix product of the patches. Ungrouped convolutions only.

        - Stride and dilation 1 with at least :data:`SHIFT_MIN_CHANNELS` input channels and many
          positions (:func:`~curvlib.engine.layers.conv_gram.shift_cost` at most
          :data:`SHIFT_MAX_COST`): from the shift correlations of ``x``
          (:func:`~curvlib.engine.layers.conv_gram.shift_gram`; no patches are formed).
        - ``None`` (the plain Gram of the patches, :func:`~curvlib.engine.factors.gram_rows`) with
          fewer than ``D / 4`` patches for ``D`` features.
        - Otherwise one weight-gradient kernel: with the patches ``act()`` as the output gradient
          of a convolution ``[C k, C, *k]`` of ``x`` (the layer's stride, padding, dilation), the
          weight gradient ``sum_{n,t} a_{n,t}[o] patch_{n,t}[(c, q)]`` is the Gram matrix. Same
          flops, but one tuned kernel instead of many small matrix products (3x faster than
          ``bmm`` on a 16-channel 3x3 conv on CPU).
        """
        if module.groups != 1 or not x.is_floating_point():
            return None
        if unbatched(module, x):
            x = x.unsqueeze(0)
        d = len(module.kernel_size)
        x, padding = zero_padded(module, x)
        k = list(module.kernel_size)
        out_size = output_size(module, x.shape[2:], [2 * p for p in padding])
        D = x.shape[1] * math.prod(k)
        if 4 * x.shape[0] * math.prod(out_size) < D:
            # few patches for many features (deep layers on small maps): the weight-gradient
            # kernel runs at a fraction of a matmul's speed there; the plain Gram of the patches
            # (resnet18 at 32x32: [32, 4608] patches 62 -> 30 ms, [128, 2304] 21 -> 6.3 ms)
            return None
        if (
            all(s == 1 for s in module.stride)
            and all(v == 1 for v in module.dilation)
            and x.shape[1] >= SHIFT_MIN_CHANNELS
            and shift_cost(x.shape[2:], padding, k) <= SHIFT_MAX_COST
        ):
            return shift_gram(x, k, padding)
        a = act()
        N, T, D = a.shape
        gout = a.transpose(1, 2).reshape(N, D, *out_size)  # a view for the unfold's layout
        weight = x.new_empty((D, x.shape[1], *module.kernel_size))
        _, gw, _ = torch.ops.aten.convolution_backward(
            gout, x, weight, None, list(module.stride), padding, list(module.dilation),
            False, [0] * d, 1, [False, True, False],
        )
        return gw.reshape(D, D)

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if unbatched(module, x):
            g = g.unsqueeze(1)
        return rearrange(g, "k n c ... -> k n (...) c")
