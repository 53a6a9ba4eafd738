"""``nn.MultiheadAttention``: its linear parts, each described as a Linear over positions.

The module applies its parameters functionally inside ``F.multi_head_attention_forward``, so no
module hook sees the projections. While an extended attention layer runs its forward (with
gradients), a ``TorchFunctionMode`` (:class:`_Intercept`) catches that call and runs PyTorch's own
code of ``F.multi_head_attention_forward`` (the same function object's code: masks, ``is_causal``,
dropout, ``need_weights``, unbatched inputs behave exactly as without curvlib) with its two
in-projection helpers and the output projection replaced by versions that record their
input and output as layer calls of the engine. The user's model is not changed.

Parts (``E`` = ``embed_dim``, ``N`` samples, ``L`` query and ``S`` key positions):

- ``in_proj`` (``in_proj_weight [3E, E]``, ``in_proj_bias [3E]``, when ``kdim = vdim = E``): one
  Linear ``E -> 3E`` over *stacked positions*: the distinct inputs among query, key, value are
  concatenated along the positions (``T = L`` for self-attention, ``L + S`` when key is value,
  ``L + 2S`` otherwise), and the output of a segment is zero outside the rows it feeds (``W_q``
  rows for the query segment, ...). Its per-sample gradient ``sum_t s_t a_t^T`` is then exact
  (the zeros remove the unused products), so every exact extension treats it as a Linear.
  KFAC gives the block form with ``B = 3`` (docs/design.md §2): ``G [3, E, E]`` (slice ``b`` of
  ``s``), ``A [3, E, E]`` from each block's own input (``A_b = 1/(N T_b) sum a a^T``; equal for
  self-attention), and ``in_proj_bias`` ``[G [3, E, E]]``: each block is the pair of a separate
  q / k / v ``nn.Linear``.
- ``q_proj`` / ``k_proj`` / ``v_proj`` (separate ``q/k/v_proj_weight`` when ``kdim`` or ``vdim``
  differ from ``E``): three bias-free Linears; ``in_proj_bias`` is then its own part over the
  stacked positions (as above), ``[G [3, E, E]]``.
- ``out_proj``: the ``nn.Linear`` submodule, recorded as a call of it on ``[N, L, E]``.

Costs: for cross-attention the stacked output (and its cotangents) is ``3E`` wide on every
position (three times the projections' own outputs); the projections' FLOPs are unchanged.
``add_bias_kv`` and ``add_zero_attn`` are refused.
"""
from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.layers.linear import LinearAdapter
from curvlib.engine.layers.parts import Projection, Segments

class ProjectionAdapter(LinearAdapter):
    """A :class:`Projection`: a Linear over positions ``[N, T, D]``, KFAC in the block form."""

    module_types = (Projection,)

    def blocks(self, module: Projection) -> int:
        return module.blocks

    def grouped(self, module: Projection) -> bool:
        return False

    def bias_blocks(self, module: Projection) -> int:
        return module.bias_blocks

    def act_factor(self, module: Projection, x: Tensor, kfac_approx: str) -> Optional[Tensor]:
        """``A [B, n, n]``: block ``b`` from the segments that feed it, ``1/(N T_b) sum a a^T``
        (expand) or ``1/N sum abar abar^T``, ``abar`` the mean over the segment (reduce)."""
        if module.blocks == 1:
            return None
        N, _, n = x.shape
        A = x.new_empty(module.blocks, n, n)
        start = 0
        for T, blocks in module.segments:
            a = x[:, start:start + T]
            start += T
            if kfac_approx == "reduce":
                a = a.mean(1)
                Ai = a.T @ a / N
            else:
                a = a.reshape(-1, n)
                Ai = a.T @ a / (N * T)
            A[list(blocks)] = Ai
        return A


    def act_factor_rows(self, module: Projection, x: Tensor, kfac_approx: str) -> Optional[Tensor]:
        """``[B]``: the rows block ``b``'s ``A`` averages, ``N T_b`` (expand) or ``N`` (reduce),
        ``T_b`` the positions of the segment feeding block ``b``."""
        if module.blocks == 1:
            return None
        rows = x.new_empty(module.blocks)
        for T, blocks in module.segments:
            rows[list(blocks)] = x.shape[0] * (1 if kfac_approx == "reduce" else T)
        return rows


class _Intercept(TorchFunctionMode):
    """Active during one forward of an extended ``nn.MultiheadAttention``: runs
    ``F.multi_head_attention_forward`` with recording projections (module docstring)."""

    def __init__(self, module: nn.MultiheadAttention, record):
        super().__init__()
        self.module, self.record = module, record
        #: ``(L, N)`` of the running call (set by the in-projection)
        self.shape: Optional[Tuple[int, int]] = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            _ACTIVE.append(self)
            try:
                return _RECORDING_MHA_FORWARD(*args, **kwargs)
            finally:
                _ACTIVE.pop()
        return func(*args, **kwargs)


#: interceptions whose ``F.multi_head_attention_forward`` is running (innermost last)
_ACTIVE: List[_Intercept] = []


def _batch_first(x: Tensor) -> Tensor:
    return x.transpose(0, 1)  # [T, N, D] (PyTorch's layout inside the function) -> [N, T, D]


def _stacked(outputs: List[Tuple[Tensor, Tuple[int, ...]]], E: int) -> Tensor:
    """``[N, sum T_i, 3E]``: each segment's output ``[N, T_i, len(blocks) E]`` in its row blocks."""
    return torch.cat([F.pad(y, (b[0] * E, (2 - b[-1]) * E)) for y, b in outputs], dim=1)


def _unstack(Y: Tensor, segments: Segments, E: int) -> List[Tensor]:
    """q, k, v ``[T, N, E]`` (contiguous, PyTorch's layout) from the stacked output ``Y``."""
    out: List[Optional[Tensor]] = [None, None, None]
    start = 0
    for T, blocks in segments:
        for b in blocks:
            out[b] = Y[:, start:start + T, b * E:(b + 1) * E].transpose(0, 1).contiguous()
        start += T
    return out


def _segments(q: Tensor, k: Tensor, v: Tensor) -> List[Tuple[Tensor, Tuple[int, ...]]]:
    """The distinct inputs (by identity, as PyTorch decides self-attention) with their blocks."""
    if k is v:
        return [(q, (0, 1, 2))] if q is k else [(q, (0,)), (k, (1, 2))]
    return [(q, (0,)), (k, (1,)), (v, (2,))]


def _in_projection_packed(q: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Optional[Tensor] = None):
    """Replaces ``F._in_projection_packed``: the same q, k, v, recorded as one ``in_proj`` part."""
    st = _ACTIVE[-1]
    st.shape = (q.shape[0], q.shape[1])
    E = q.shape[-1]
    segs = [(_batch_first(x), blocks) for x, blocks in _segments(q, k, v)]
    if len(segs) == 1:  # self-attention: one Linear E -> 3E
        X = segs[0][0]
        Y = F.linear(X, w, b)
    else:
        outs = []
        for x, blocks in segs:
            rows = slice(blocks[0] * E, (blocks[-1] + 1) * E)
            outs.append((F.linear(x, w[rows], None if b is None else b[rows]), blocks))
        Y = _stacked(outs, E)
        with torch.no_grad():
            X = torch.cat([x for x, _ in segs], dim=1)
    segments = tuple((x.shape[1], blocks) for x, blocks in segs)
    m = st.module
    part = Projection(m, "in_proj", m.in_proj_weight, m.in_proj_bias, 3, 3, segments)
    st.record(part, X, Y)
    return _unstack(Y, segments, E)


def _in_projection(q, k, v, w_q, w_k, w_v, b_q=None, b_k=None, b_v=None):
    """Replaces ``F._in_projection`` (separate q/k/v weights): three bias-free Linear parts,
    and ``in_proj_bias`` as one part over the stacked positions."""
    st = _ACTIVE[-1]
    st.shape = (q.shape[0], q.shape[1])
    m = st.module
    xs = [_batch_first(x) for x in (q, k, v)]
    ys = []
    for name, x, w in zip(("q_proj", "k_proj", "v_proj"), xs, (w_q, w_k, w_v)):
        y = F.linear(x, w)
        st.record(Projection(m, name, weight=getattr(m, f"{name}_weight")), x, y)
        ys.append(y)
    if b_q is None:
        return [y.transpose(0, 1).contiguous() for y in ys]
    E = ys[0].shape[-1]
    segments = tuple((x.shape[1], (i,)) for i, x in enumerate(xs))
    Y = _stacked([(y, (i,)) for i, y in enumerate(ys)], E) + m.in_proj_bias
    st.record(Projection(m, "in_proj_bias", bias=m.in_proj_bias, bias_blocks=3, segments=segments), xs[0], Y)
    return _unstack(Y, segments, E)


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """Replaces ``linear`` in ``F.multi_head_attention_forward`` (only the output projection,
    on rows ``(l, n)``): computed on ``[N, L, E]`` and recorded as a call of ``out_proj``."""
    st = _ACTIVE[-1] if _ACTIVE else None
    if st is None or st.shape is None or w is not st.module.out_proj.weight:
        return F.linear(x, w, b)
    L, N = st.shape
    xb = x.reshape(L, N, x.shape[-1]).transpose(0, 1)
    y = F.linear(xb, w, b)
    st.record(st.module.out_proj, xb, y)
    return y.transpose(0, 1).reshape(L * N, y.shape[-1])


def _recording_copy():
    """``F.multi_head_attention_forward``'s own code with the recording helpers above in its
    globals (``None`` if this PyTorch has no such helpers: attention is then refused)."""
    f = F.multi_head_attention_forward
    if not all(n in f.__globals__ for n in ("_in_projection_packed", "_in_projection", "linear")):
        return None
    g = dict(f.__globals__)
    g.update(_in_projection_packed=_in_projection_packed, _in_projection=_in_projection, linear=_linear)
    copy = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__ = f.__kwdefaults__
    return copy


_RECORDING_MHA_FORWARD = _recording_copy()


class MultiheadAttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention``: a composite layer; its parts are :class:`Projection` s and
    ``out_proj`` (module docstring)."""

    module_types = (nn.MultiheadAttention,)
    composite = True

    def check(self, module: nn.Module) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError(
                f"curvlib: {module} uses add_bias_kv={module.bias_k is not None}, "
                f"add_zero_attn={module.add_zero_attn}; curvature of attention supports neither "
                "(the appended key/value positions are not a projection of the inputs). "
                "Use add_bias_kv=False and add_zero_attn=False, or leave the layer out of extend()."
            )
        if _RECORDING_MHA_FORWARD is None:
            raise NotImplementedError(
                f"curvlib: {module}: this PyTorch version's F.multi_head_attention_forward has no "
                "_in_projection_packed / _in_projection helpers to record; attention is unsupported."
            )

    def intercept(self, module: nn.Module, record) -> _Intercept:
        return _Intercept(module, record)


__all__ = ["MultiheadAttentionAdapter", "Projection", "ProjectionAdapter"]
