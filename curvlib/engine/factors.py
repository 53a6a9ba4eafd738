r"""The per-sample factorisation of a layer's curvature, in one place: pure tensor math.

Every extension is a function of a layer's captured vectors (see
:mod:`curvlib.engine.layers.base`): activation-side ``a [N, T, D_a]`` and cotangent-side
``s [K, N, T, D_s]`` with per-sample gradients

    X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T     (weight viewed as [D_s, D_a], "right")
    X_{k,n} = sum_t a_{n,t} s_{k,n,t}^T     (weight viewed as [D_a, D_s], "left": transposed
                                              convolutions, Embedding)

and summed parameters (biases, norm layers' elementwise scales) with ``x_{k,n} = sum_t s'_{k,n,t}``.
The curvature block of a parameter is ``sum_{k,n} vec(X_kn) vec(X_kn)^T`` (exact) and KFAC's is
``G ⊗ A`` in the parameter's orientation. This module owns:

- :class:`Orientation`: which side of the weight the activations are on, and everything that
  depends on it (factor order, einsum equations, transposes);
- :func:`outer_sum`: per-sample weight gradients from ``s`` and ``a``, into an ``out=`` buffer;
- :func:`gram`, :func:`gram_rows`, :func:`block_gram`: the symmetric factor products;
- :func:`kfac_cot_factor`, :func:`kfac_act_factor`: KFAC factors for ``kfac_approx`` expand /
  reduce (Eschenhagen et al. 2023);
- :class:`BlockStructure`: the form of a parameter's block -- dense Kronecker,
  diagonal-times-dense (a 1-D factor, Embedding), block form over ``B`` groups (grouped
  convolutions), summed (the exact ``[G]`` of a bias or a norm layer's scale), or tied (one
  parameter used by several layers, :mod:`curvlib.engine.tying`).

Nothing here reads a capture: the methods of :class:`~curvlib.engine.capture.LayerCapture`
(``per_sample_grads``, ``kfac_weight_factors``, ``structure``, ...) apply these to a layer's
captured vectors. Extensions call those and never branch on ``act_side`` themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import Tensor

KFAC_APPROX = ("expand", "reduce")


# ---------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """Which side of the weight matrix (``p`` viewed as ``[p.shape[0], -1]``) the activations
    are on: ``"right"`` (``[D_s, D_a]``: Linear, Conv) or ``"left"`` (``[D_a, D_s]``).

    Factor ``0`` is always over ``p.shape[0]``; :meth:`pair` orders a (cotangent, activation)
    pair accordingly, so that ``kron(F_0, F_1)`` is a block of ``p.flatten()``.
    """

    act_side: str

    def __post_init__(self):
        if self.act_side not in ("right", "left"):
            raise ValueError(f"curvlib: act_side must be 'right' or 'left', got {self.act_side!r}.")

    @property
    def act_index(self) -> int:
        """Position of the activation factor in :meth:`pair` (1 for right, 0 for left)."""
        return 1 if self.act_side == "right" else 0

    @property
    def cot_index(self) -> int:
        return 1 - self.act_index

    def pair(self, cot: Any, act: Any) -> List[Any]:
        """``[cot, act]`` (right) or ``[act, cot]`` (left): factor order of the parameter."""
        out = [None, None]
        out[self.cot_index], out[self.act_index] = cot, act
        return out

    def unpair(self, pair: Sequence[Any]) -> Tuple[Any, Any]:
        """``(cot, act)`` of a pair in the parameter's factor order (inverse of :meth:`pair`)."""
        return pair[self.cot_index], pair[self.act_index]

    def side(self, i: int) -> str:
        """``"cot"`` or ``"act"``: which side factor ``i`` of the parameter is over."""
        return "act" if i == self.act_index else "cot"

    def to_cot_act(self, M: Tensor) -> Tensor:
        """A weight-shaped ``[..., d0, d1]`` matrix as ``[..., D_s, D_a]`` (a transposed view for
        left); its own inverse."""
        return M if self.act_side == "right" else M.transpose(-1, -2)

    from_cot_act = to_cot_act

    @property
    def outer_equation(self) -> str:
        """einsum ``s [K, N, T, D_s], a [N, T, D_a] -> X [K, N, d0, d1]``."""
        return "knts,nta->knsa" if self.act_side == "right" else "knts,nta->knas"

    def weight_times_act(self, a2: Tensor, V: Tensor, D_s: int) -> Tensor:
        """``[r, (b s)] = sum_a a2[r, a] W_b[s, a]`` for ``a2 [R, D_a]`` and weight-shaped
        ``V [B, d0, d1]``: all ``B`` columns in one GEMM."""
        B = V.shape[0]
        if self.act_side == "right":  # V: [B, D_s, D_a]
            return a2 @ V.reshape(B * D_s, -1).T
        return a2 @ rearrange(V.reshape(B, -1, D_s), "b a s -> a (b s)")  # V: [B, D_a, D_s]

    def outer_to_weight(self, u2: Tensor, a2: Tensor, B: int) -> Tensor:
        """``sum_r u_b[r] a2[r]^T`` as weight-shaped ``[B, d0, d1]`` from ``u2 [(b s), R]``
        (right) / ``[R, (b s)]`` (left): the layout :meth:`outer_pattern` names."""
        if self.act_side == "right":  # [(b s), R] @ [R, D_a] -> [B, D_s, D_a]
            return (u2 @ a2).reshape(B, -1, a2.shape[-1])
        return rearrange(a2.T @ u2, "a (b s) -> b a s", b=B)  # [B, D_a, D_s]

    def outer_pattern(self, rows: str) -> str:
        """The einops layout :meth:`outer_to_weight` expects of ``u2``, ``rows`` naming the rows
        of ``a2`` (e.g. ``"(n t)"``)."""
        return f"(b s) {rows}" if self.act_side == "right" else f"{rows} (b s)"

    def block_of_grams(self, B: Tensor) -> Tensor:
        """``B [D_s, D_s, D_a, D_a]`` (``sum S_ij A_kl``) -> the ``[p.numel(), p.numel()]`` block in
        ``p.flatten()`` order."""
        eq = "i j k l -> (i k) (j l)" if self.act_side == "right" else "i j k l -> (k i) (l j)"
        return rearrange(B, eq)


RIGHT = Orientation("right")
LEFT = Orientation("left")


def orientation(act_side: str | Orientation) -> Orientation:
    """The :class:`Orientation` of ``act_side`` (``"right"`` or ``"left"``; an
    :class:`Orientation` is returned as is)."""
    if isinstance(act_side, Orientation):
        return act_side
    if act_side == "right":
        return RIGHT
    if act_side == "left":
        return LEFT
    return Orientation(act_side)  # raises


def common_orientation(*sides: Optional[Orientation]) -> Optional[Orientation]:
    """The orientation shared by the weights among ``sides`` (``None`` entries: biases, which pair
    either way; right if all are ``None``), or ``None`` if they are mixed."""
    found = {o for o in sides if o is not None}
    if len(found) > 1:
        return None
    return found.pop() if found else RIGHT


# ---------------------------------------------------------------- per-sample gradients


def outer_sum(s: Tensor, a: Tensor, orient: Orientation, out: Tensor) -> Tensor:
    """Per-sample weight gradients ``X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T`` written to ``out``.

    Args:
        s: cotangent side ``[K, N, T, D_s]``; a: activation side ``[N, T, D_a]``.
        orient: ``RIGHT`` (``X`` is ``[D_s, D_a]``) or ``LEFT`` (``X^T``: ``[D_a, D_s]``); a string
            ``"right"`` / ``"left"`` is accepted too.
        out: contiguous, ``K * N * D_s * D_a`` entries (any shape with leading ``K * N``).

    Returns ``out``. ``T = 1``: one broadcasting multiply; ``T > 1``: one batched matmul, over
    the samples with the ``K`` columns stacked (``s`` copied once) where that copies less than
    broadcasting ``a`` over the ``K`` columns.
    """
    orient = orientation(orient)
    K, N, T, Ds = s.shape
    Da = a.shape[-1]
    right = orient.act_side == "right"
    X = out.view(K, N, Ds, Da) if right else out.view(K, N, Da, Ds)
    if T == 1:
        s1, a1 = s[:, :, 0], a[:, 0]  # [K, N, D_s], [N, D_a]
        if right:
            torch.mul(s1[..., :, None], a1[None, :, None, :], out=X)
        else:
            torch.mul(a1[None, :, :, None], s1[..., None, :], out=X)
    elif K == 1:
        if right:
            torch.bmm(s[0].transpose(1, 2), a, out=X[0])
        else:
            torch.bmm(a.transpose(1, 2), s[0], out=X[0])
    elif T * Ds + Ds * Da < T * Da:
        # one bmm per sample over all K columns (copying s to [N, K D_s, T] and the result back)
        # instead of a matmul broadcasting a over K (a copy of a K times): conv cotangents with
        # D_a = C_in prod(k) > D_s, e.g. [9, 64, 576, 10] with a [64, 576, 25]: 3.6 ms -> 2.0 ms,
        # [9, 64, 64, 20] with [64, 64, 250]: 12.8 ms -> 2.8 ms (CPU, 2 threads)
        sn = rearrange(s, "k n t s -> n (k s) t")
        if right:
            Y = torch.bmm(sn, a)  # [N, K D_s, D_a]
            X.copy_(rearrange(Y, "n (k s) a -> k n s a", k=K))
        else:
            Y = torch.bmm(a.transpose(1, 2), sn.transpose(1, 2))  # [N, D_a, K D_s]
            X.copy_(rearrange(Y, "n a (k s) -> k n a s", k=K))
    else:
        if right:
            torch.matmul(s.transpose(-1, -2), a, out=X)
        else:
            torch.matmul(a.transpose(-1, -2), s, out=X)
    return out


# ---------------------------------------------------------------- Gram matrices


#: columns per panel of :func:`gram` and per intra-op thread (module docstring of ``gram``)
GRAM_PANEL = 64
#: at most this many panels (wider ones for ``D`` above ``64 * GRAM_MAX_PANELS``)
GRAM_MAX_PANELS = 32


def gram(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * x^T x`` for ``x`` of shape ``[M, D]`` (``scale`` inside the GEMMs: no pass of
    its own over the result, e.g. KFAC's ``A = 1/(N T) sum a a^T``).

    Symmetric: only the upper triangle is computed, by panels of ``b`` rows,
    ``out[i:i+b, i:] = x[:, i:i+b]^T x[:, i:]`` (one GEMM each, written in place through a
    view: no copies), and each panel's strictly lower part is mirrored from it (one
    transposed copy per panel). ``(1 + b/D)/2`` of the flops of one ``matmul``.
    ``b = GRAM_PANEL * torch.get_num_threads()``: 64 rows per thread, widened to a multiple of 64
    for at most ``GRAM_MAX_PANELS = 32`` panels (resnet18's ``[512, 4608]``: panels of 64
    177 ms, of 128-256 168 ms; recursive halving 178, one matmul 247). One ``matmul``
    for ``D <= b``, for integer or autograd inputs, and for fewer than 128 rows, where the
    product is bound by writing the ``D x D`` result rather than by flops.

    Measured (CPU, 1 thread, medians, ms; the recursive halving this replaced in
    parentheses, which went down to 128-256 columns: ``[256, 196]`` blocks there ran at
    ~60 GFLOP/s against ~100 for the full product):
    ``[256, 784]`` 1.84 (2.01; one matmul 2.77), ``[256, 512]`` 0.94 (1.00; 1.22),
    ``[256, 256]`` 0.25 (0.28; 0.31), ``[2304, 512]`` 7.2 (7.9; 11.1), ``[3136, 144]``
    0.91 (1.27). Panels of 128 rows were within 5 % on ``M = 256`` and 5-20 % slower on
    ``M >= 2304`` with 1 thread, and ~5-10 % faster on ``M = 256`` with 2 threads. With few
    rows the mirror costs more than the flops it saves: ``[8, 1568]`` one matmul 0.48 ms,
    panels 0.74-0.88; ``[64, 4096]`` 49 ms against 54-57.
    """
    M, D = x.shape
    b = max(GRAM_PANEL * max(1, torch.get_num_threads()), -(-D // (GRAM_MAX_PANELS * 64)) * 64)
    grad = x.requires_grad and torch.is_grad_enabled()
    if D <= b or M < 128 or not x.is_floating_point() or grad:
        out = x.T @ x
        if scale == 1.0:
            return out
        return out * scale if grad or not x.is_floating_point() else out.mul_(scale)  # no fresh D x D
    out = x.new_empty(D, D)
    for i in range(0, D, b):
        e = min(i + b, D)
        panel = out[i:e, i:]
        if scale == 1.0:
            torch.mm(x[:, i:e].T, x[:, i:], out=panel)
        else:
            torch.addmm(panel, x[:, i:e].T, x[:, i:], beta=0, alpha=scale, out=panel)
        if e < D:
            out[e:, i:e] = out[i:e, e:].T
    return out


def gram_rows(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * sum_r x_r x_r^T`` over all rows ``r`` of ``x`` ``[..., T, D]``.

    Position-major views of channel-major data (conv patches and output gradients, whose
    ``T`` axis is the contiguous one) with at least as many positions as features
    (``T >= D``) are contracted per batch entry with one batched matmul instead of being
    copied into a ``[rows, D]`` matrix first; with ``T < D`` (deep convolutions: few positions,
    many channels) the ``[B, D, D]`` partial Grams would cost more than the copy (resnet18's
    3x3 convolutions on 2x2 positions: a 680 MB intermediate, 5x curvlinops' time).
    """
    if x.ndim >= 3 and x.shape[-2] >= max(2, x.shape[-1]) and x.stride(-2) == 1 and x.stride(-1) != 1:
        xt = x.transpose(-1, -2).reshape(-1, x.shape[-1], x.shape[-2])  # [B, D, T], a view
        out = torch.bmm(xt, xt.transpose(1, 2)).sum(0)
        return out if scale == 1.0 else out.mul_(scale)
    return gram(x.reshape(-1, x.shape[-1]), scale)


def block_gram(x: Tensor, blocks: int) -> Tensor:
    """``[B, m, m]``: the Gram matrices of the ``B`` contiguous slices of the last dimension
    of ``x`` ``[..., B m]`` (grouped convolutions: each group's own factor)."""
    xr = x.reshape(-1, blocks, x.shape[-1] // blocks)
    return torch.einsum("rbi,rbj->bij", xr, xr)


def diag_rows(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * sum_r x_r * x_r`` ``[D]`` over all rows ``r`` of ``x`` ``[..., D]``: the diagonal of
    :func:`gram_rows` without its ``D x D`` matrix (a factor side above ``max_factor_dim``)."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.einsum("rd,rd->d", x2, x2)
    return out if scale == 1.0 else out.mul_(scale)


# ---------------------------------------------------------------- KFAC factors

#: the default ``max_factor_dim`` of the Kronecker extensions and optimizer groups: a factor side
#: of a larger dimension is kept diagonal (1-D). A dense ``d x d`` factor costs ``4 d^2`` bytes
#: (float32) and an ``O(d^3)`` eigendecomposition at every inverse update. Measured
#: (``benchmarks/bench_max_factor_dim.py``, CPU, 2 threads on a machine loaded ~8x, medians of 3
#: interleaved): ``eigh`` of d = 512 / 1024 / 2048 took 6.6 / 22 / 153 s (7x per doubling; an
#: earlier run 2.4 / 8.9 s at 1024 / 2048 and 244 s at 4096), so 8192 (256 MiB) costs minutes per
#: inverse on a CPU and a vocabulary side (GPT-2's 50,257: 10 GB) is out of reach. 8192 keeps
#: every side of common models dense (ResNet / VGG convolutions' 512 x 3 x 3 = 4608, GPT-2's 3072,
#: Llama-7B's 4096 hidden size) and makes vocabulary-sized sides diagonal, where the softmax
#: Fisher's off-diagonal ``-p_i p_j`` is small: on a Linear(64, 1024) head's ``G`` (mc, 8 x 16
#: tokens, damping 1e-3 exact) the damped direction with diagonal ``G`` is 0.9 % from the dense one
#: (cosine 1.0000), with ``G`` block-diagonal in blocks of 128 1.0 % (0.4 % for 2048 outputs), the
#: inverse built in 1.0 s against 25 / 28 s: diagonal, not block-diagonal.
MAX_FACTOR_DIM = 8192


def kfac_cot_factor(s: Tensor, kfac_approx: str = "expand", blocks: int = 1, diagonal: bool = False) -> Tensor:
    """``G``: ``sum_{k,n,t} s s^T`` (expand) or ``sum_{k,n} sbar sbar^T``, ``sbar = sum_t s``
    (reduce), for ``s [K, N, T, D_s]``; ``[B, m, m]`` over ``blocks = B > 1`` groups; ``diagonal``:
    only its diagonal, 1-D ``[D_s]`` (no ``D_s x D_s`` matrix is formed)."""
    if kfac_approx == "reduce":
        s = s.sum(2)
    if diagonal:
        _one_block(blocks)
        return diag_rows(s)
    return gram_rows(s) if blocks == 1 else block_gram(s, blocks)


def kfac_act_factor(a: Tensor, kfac_approx: str = "expand", blocks: int = 1, diagonal: bool = False) -> Tensor:
    """``A``: ``1/(N T) sum_{n,t} a a^T`` (expand) or ``1/N sum_n abar abar^T``,
    ``abar = mean_t a`` (reduce), for ``a [N, T, D_a]``; ``[B, n, n]`` over ``B > 1`` groups;
    ``diagonal``: only its diagonal, 1-D ``[D_a]``."""
    if kfac_approx == "reduce":
        a = a.mean(1)
    rows = a.shape[:-1].numel()
    if diagonal:
        _one_block(blocks)
        return diag_rows(a, 1.0 / rows)
    return gram_rows(a, 1.0 / rows) if blocks == 1 else block_gram(a, blocks).div_(rows)


def _one_block(blocks: int) -> None:
    if blocks != 1:
        raise ValueError(
            f"curvlib: a diagonal (1-D) factor of the block form over {blocks} groups is not a "
            "representation of docs/design.md §2; raise max_factor_dim above the group's factor sides."
        )


def exceeds(dim: int, max_factor_dim: Optional[int]) -> bool:
    """Whether a factor side of dimension ``dim`` is kept diagonal under ``max_factor_dim``
    (``None``: never)."""
    return max_factor_dim is not None and dim > max_factor_dim


# ---------------------------------------------------------------- block structure


@dataclass(frozen=True)
class BlockStructure:
    """The form of one parameter's curvature block (docs/design.md §2).

    ``kind``:
        ``"summed"``: no activation side (a bias, a norm layer's scale): the exact block ``[G]``;
        ``"kronecker"``: one dense pair ``[F0, F1]``;
        ``"diagonal"``: a pair with a 1-D (diagonal) activation factor (Embedding);
        ``"blocks"``: the block form over ``blocks`` groups, ``[F0 [B, ., .], F1 [B, ., .]]``;
        ``"tied"``: a parameter used by several layers (:mod:`curvlib.engine.tying`): no single
        orientation, its per-sample gradient the sum of its uses'.
    """

    kind: str
    blocks: int = 1
    orientation: Optional[Orientation] = None
    #: the activations are in the grouped layout (grouped convolutions: block ``b`` uses only its
    #: slice of ``a``), so the per-sample gradients are not one ``sum_t s a^T``
    grouped: bool = False

    @property
    def summed(self) -> bool:
        return self.kind == "summed"

    @property
    def kronecker(self) -> bool:
        """A single Kronecker pair (dense or diagonal-times-dense), not the block form."""
        return self.kind in ("kronecker", "diagonal")

    @property
    def factored(self) -> bool:
        """Whether the per-sample gradients of a (non-summed) weight are one ``sum_t s a^T`` of the
        capture's ``cot()`` and ``act()`` in :attr:`orientation`. ``False`` for the grouped layout
        and for tied parameters: extensions then read ``capture.per_sample_grads``."""
        return not (self.grouped or self.kind == "tied")


__all__ = [
    "Orientation",
    "RIGHT",
    "LEFT",
    "orientation",
    "common_orientation",
    "outer_sum",
    "gram",
    "gram_rows",
    "block_gram",
    "diag_rows",
    "MAX_FACTOR_DIM",
    "exceeds",
    "KFAC_APPROX",
    "kfac_cot_factor",
    "kfac_act_factor",
    "BlockStructure",
]
