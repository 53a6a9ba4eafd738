"""Where the samples of a batch are in a tensor: exact lineage through reshapes and permutations.

A layer adapter reads the samples from dimension 0 of its layer's input (the convention of every
``nn.Module`` layer, docs/design.md §3). An *operation* often runs on a reshaped input: HF
``Conv1D`` computes ``addmm(b, x.view(-1, D), W)`` on ``x [N, T, D]``, whose rows are ``N T``
positions of ``N`` samples, not ``N T`` samples. While an extended model with parameters outside
adapted modules runs its forward, the operation capture (:mod:`curvlib.engine.operations`)
follows every tensor's *layout* through the shape operations, exactly:

    Layout(dim, samples, rows): dimension ``dim`` holds ``samples * rows`` entries, sample-major
    (entry ``i`` belongs to sample ``i // rows``); every other dimension is within a sample.

A tensor that no shape operation produced has the default layout ``Layout(0, shape[0], 1)`` (the
convention above; it is not stored); a vector without a stored layout (``arange(T)``, a buffer) has
no samples' dimension, and its reshapes keep the default layout. Reshapes (``view``, ``reshape``, ``flatten``, ``unflatten``,
``squeeze``, ``unsqueeze``), permutations (``transpose``, ``permute``, ``movedim``, ``.T``),
``expand``, basic indexing, splits, ``cat`` / ``stack`` and operations that act within rows
(elementwise, ``softmax``, ``linear`` / ``matmul`` on the trailing dimensions, reductions over
other dimensions) map a layout to the exact layout of their output; any other operation on a tensor
with a non-default layout, or a reshape that mixes samples (``[T, N, D] -> [T N, D]``), gives
:data:`UNKNOWN`, and a parameter's operation on such an input raises an error naming both (never a
guessed grouping). A non-default layout is stored on the tensor (attribute ``_curvlib_layout``).

:func:`per_sample` views a tensor with its samples in dimension 0 (``[N, ...]``, or ``[N, m, ...]``
for ``m`` rows per sample) and :func:`restore` undoes it: a rule records the per-sample views of an
operation's input and output and returns the restored output, so that the gradient of the
recorded view is the per-sample cotangent (same values, two views more in the graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ATTR = "_curvlib_layout"


@dataclass(frozen=True)
class Layout:
    """Dimension ``dim`` of a tensor holds ``samples * rows`` entries, ``rows`` consecutive ones
    per sample (module docstring); ``dim = -1``: unknown."""

    dim: int
    samples: int
    rows: int

    @property
    def known(self) -> bool:
        return self.dim >= 0


UNKNOWN = Layout(-1, 0, 0)

_TB = torch._C.TensorBase


def layout_of(t: Tensor) -> Layout:
    """``t``'s layout (the default one unless a shape operation of the capture stored another)."""
    L = t.__dict__.get(ATTR)
    if L is not None:
        return L
    return Layout(0, t.shape[0] if t.ndim else 1, 1)


def is_default(t: Tensor, L: Layout) -> bool:
    return L.dim == 0 and L.rows == 1 and t.ndim > 0 and L.samples == t.shape[0]


def _store(t: Any, L: Layout) -> None:
    if not isinstance(t, Tensor):
        return
    if L.known and t.ndim and L.dim == 0 and L.rows == 1 and L.samples == t.shape[0]:
        t.__dict__.pop(ATTR, None)  # default: not stored
    else:
        setattr(t, ATTR, L)


# ------------------------------------------------------------------ the layout algebra
def reshaped(shape: Sequence[int], L: Layout, out: Sequence[int]) -> Layout:
    """The layout after a row-major reshape ``shape -> out`` (view, reshape, flatten, ...).

    With ``pre`` the entries before ``L.dim`` and ``block = rows * prod(shape[dim+1:])`` the
    entries of one sample within one ``pre`` index, the samples stay in one output dimension ``d'``
    iff ``prod(out[:d']) == pre`` and the entries after it divide ``block``; then
    ``rows' = block / prod(out[d'+1:])``."""
    if not L.known:
        return UNKNOWN
    d, N = L.dim, L.samples
    pre = math.prod(shape[:d])
    block = L.rows * math.prod(shape[d + 1:])
    total = pre * N * block
    acc = 1
    for i, s in enumerate(out):
        if acc == pre and s % N == 0 and s > 0:
            post = total // (acc * s) if acc * s else 0
            if post and block % post == 0 and s == N * (block // post):
                return Layout(i, N, block // post)
        acc *= s
        if acc > pre:
            break
    return UNKNOWN


def permuted(L: Layout, perm: Sequence[int]) -> Layout:
    """The layout after a permutation: output dim ``i`` is input dim ``perm[i]``."""
    if not L.known:
        return UNKNOWN
    return Layout(list(perm).index(L.dim), L.samples, L.rows)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# ------------------------------------------------------------------ shape operations
def _perm_transpose(args, kwargs, n):
    a, b = _dim(_arg(args, kwargs, 1, "dim0"), n), _dim(_arg(args, kwargs, 2, "dim1"), n)
    p = list(range(n))
    p[a], p[b] = p[b], p[a]
    return p


def _perm_permute(args, kwargs, n):
    dims = args[1:] if len(args) > 1 else kwargs.get("dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = dims[0]
    return [_dim(d, n) for d in dims]


def _perm_movedim(args, kwargs, n):
    src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [_dim(s, n) for s in src], [_dim(d, n) for d in dst]
    rest = iter(i for i in range(n) if i not in src)
    moved = dict(zip(dst, src))
    return [moved[i] if i in moved else next(rest) for i in range(n)]


def _perm_t(args, kwargs, n):
    return list(range(n))[::-1] if n == 2 else list(range(n))


def _perm_reverse(args, kwargs, n):
    return list(range(n))[::-1]


def _perm_mT(args, kwargs, n):
    p = list(range(n))
    p[-1], p[-2] = p[-2], p[-1]
    return p


#: reshapes (the output's shape says all)
_RESHAPES = {
    _TB.view, _TB.reshape, _TB.flatten, _TB.unflatten, _TB.squeeze, _TB.unsqueeze, _TB.contiguous,
    _TB.view_as, _TB.reshape_as, torch.reshape, torch.flatten, torch.unflatten, torch.squeeze,
    torch.unsqueeze, _TB.ravel, torch.ravel,
}
#: permutations: func -> (args, kwargs, ndim) -> perm
_PERMS: Dict[Any, Callable] = {
    _TB.transpose: _perm_transpose, torch.transpose: _perm_transpose, _TB.swapaxes: _perm_transpose,
    _TB.swapdims: _perm_transpose, torch.swapaxes: _perm_transpose, torch.swapdims: _perm_transpose,
    _TB.permute: _perm_permute, torch.permute: _perm_permute, _TB.movedim: _perm_movedim,
    torch.movedim: _perm_movedim, _TB.moveaxis: _perm_movedim, torch.moveaxis: _perm_movedim,
    _TB.t: _perm_t, torch.t: _perm_t, _TB.T.__get__: _perm_reverse, _TB.mT.__get__: _perm_mT,
}
#: splits along ``dim`` (positional index of ``dim``, default)
_SPLITS = {
    _TB.split: (2, 0), torch.split: (2, 0), _TB.chunk: (2, 0), torch.chunk: (2, 0),
    _TB.tensor_split: (2, 0), torch.tensor_split: (2, 0), _TB.narrow: (1, None), torch.narrow: (1, None),
}
#: a dimension removed: ``(positional index of dim, default)``
_REMOVES = {_TB.unbind: (1, 0), torch.unbind: (1, 0), _TB.select: (1, None), torch.select: (1, None)}
#: the input rows map to the output rows one to one (the layout of an input of the output's
#: ndim and batch size carries over)
_ROWWISE = {
    # elementwise
    _TB.add, _TB.sub, _TB.mul, _TB.div, _TB.true_divide, _TB.neg, _TB.pow, _TB.exp, _TB.log,
    _TB.sqrt, _TB.rsqrt, _TB.abs, _TB.tanh, _TB.sigmoid, _TB.relu, _TB.sin, _TB.cos, _TB.erf,
    _TB.clamp, _TB.masked_fill, _TB.to, _TB.type, _TB.type_as, _TB.float, _TB.double, _TB.half,
    _TB.bfloat16, _TB.clone, _TB.detach, _TB.add_, _TB.mul_, _TB.sub_, _TB.div_, torch.Tensor.__rsub__,
    torch.Tensor.__rtruediv__, torch.Tensor.__rpow__, _TB.square, _TB.reciprocal, _TB.float_power, _TB.where,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.neg, torch.pow, torch.exp,
    torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.tanh, torch.sigmoid, torch.relu, torch.sin,
    torch.cos, torch.erf, torch.clamp, torch.where, torch.square, torch.reciprocal, torch.clone,
    torch.detach, torch.dropout, torch.masked_fill, torch.rsub,
    F.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.mish, F.hardtanh, F.dropout,
    F.tanh, F.sigmoid, F.relu6, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.logsigmoid,
    # within the trailing dimensions
    F.linear, F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm, F.normalize,
    # per entry of dimension 0 (the convolutions' and norms' batch)
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.group_norm, torch.group_norm, F.batch_norm, torch.batch_norm, F.instance_norm,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.pad,
}
#: ``addmm(b, x, W)``: the rows of ``x``
_ADDMM = {torch.addmm, _TB.addmm}
#: act along ``dim``: rowwise unless ``dim`` is the samples' dimension
_ALONG = {_TB.softmax: (1, "dim"), torch.softmax: (1, "dim"), F.softmax: (1, "dim"),
          _TB.log_softmax: (1, "dim"), torch.log_softmax: (1, "dim"), F.log_softmax: (1, "dim"),
          _TB.cumsum: (1, "dim"), torch.cumsum: (1, "dim")}
#: reductions over ``dim`` (``keepdim`` kwarg)
_REDUCE = {_TB.sum, _TB.mean, torch.sum, torch.mean, _TB.amax, torch.amax, _TB.amin, torch.amin}
_MATMUL = {_TB.matmul, torch.matmul, _TB.__matmul__, torch.Tensor.__rmatmul__, _TB.mm, torch.mm, _TB.bmm, torch.bmm}
#: append dimensions to their first argument's (the index tensors of a lookup)
_EXTEND = {F.embedding, F.one_hot}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_STACK = {torch.stack}
_EXPAND = {_TB.expand, _TB.expand_as}

#: every function whose output layout is computed even from default inputs
SHAPE_OPS = frozenset(_RESHAPES | set(_PERMS) | set(_SPLITS) | set(_REMOVES) | _EXPAND | {_TB.__getitem__})


def _tensors(args: tuple, kwargs: dict):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor):
                    yield b
    for a in kwargs.values():
        if isinstance(a, Tensor):
            yield a


def propagate(func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
    """Store the layout of ``out`` (the result of ``func(*args, **kwargs)``) where it is not the
    default one (module docstring). The caller calls it for the shape operations and for the
    operations with an argument that has a stored layout."""
    if func in SHAPE_OPS:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            return
        _shape_op(func, x, args, kwargs, out)
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if isinstance(o, Tensor):
            _store(o, _derived(func, args, kwargs, o))


def _shape_op(func, x: Tensor, args, kwargs, out) -> None:
    n = x.ndim
    if n <= 1 and ATTR not in x.__dict__:
        return  # a vector (arange(T), a buffer) has no samples' dimension: nothing to follow
    L = layout_of(x)
    if func in _RESHAPES:
        _store(out, reshaped(x.shape, L, out.shape))
    elif func in _PERMS:
        _store(out, permuted(L, _PERMS[func](args, kwargs, n)) if n else L)
    elif func in _EXPAND:
        k = out.ndim - n
        if is_default(x, L):
            _store(out, Layout(0, out.shape[0], 1) if out.ndim else UNKNOWN)
        else:
            ok = L.known and out.shape[L.dim + k] == x.shape[L.dim]
            _store(out, Layout(L.dim + k, L.samples, L.rows) if ok else UNKNOWN)
    elif func is _TB.__getitem__:
        if not is_default(x, L):
            _store(out, _indexed(L, n, args[1] if len(args) > 1 else None, out))
    elif func in _SPLITS:
        i, default = _SPLITS[func]
        d = _arg(args, kwargs, i, "dim", default)
        if is_default(x, L):
            return
        ok = L.known and d is not None and _dim(d, n) != L.dim
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            _store(o, L if ok else UNKNOWN)
    elif func in _REMOVES:
        i, default = _REMOVES[func]
        d = _arg(args, kwargs, i, "dim", default)
        if is_default(x, L):
            return
        d = None if d is None else _dim(d, n)
        ok = L.known and d is not None and d != L.dim
        M = Layout(L.dim - (d < L.dim), L.samples, L.rows) if ok else UNKNOWN
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            _store(o, M)


def _indexed(L: Layout, n: int, index: Any, out: Tensor) -> Layout:
    """The layout after ``x[index]`` for basic indices (ints, slices, ``None``, ``...``): the
    samples' dimension must be taken whole."""
    if not L.known:
        return UNKNOWN
    idx = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return UNKNOWN
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (n - consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (n - sum(1 for i in expanded if i is not None)))
    d_in, d_out = 0, 0
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if d_in == L.dim:
            whole = isinstance(i, slice) and i == slice(None)
            return Layout(d_out, L.samples, L.rows) if whole else UNKNOWN
        d_in += 1
        if not isinstance(i, int):
            d_out += 1
    return UNKNOWN


def _derived(func, args, kwargs, out: Tensor) -> Layout:
    """The layout of a non-shape operation's output ``out`` from its inputs' layouts."""
    ins = [t for t in _tensors(args, kwargs)]
    if func in _ROWWISE:
        return _carried(ins, out)
    if func in _ALONG:
        i, name = _ALONG[func]
        d = _arg(args, kwargs, i, name)
        M = _carried(ins, out)
        return M if M.known and d is not None and _dim(d, out.ndim) != M.dim else UNKNOWN
    if func in _ADDMM:
        x = args[1] if len(args) > 1 else kwargs.get("mat1")
        L = layout_of(x)
        return L if L.known and L.dim == 0 else UNKNOWN
    if func in _EXTEND:
        L = layout_of(ins[0])
        return L if L.known and ins[0].ndim < out.ndim else UNKNOWN
    if func in _REDUCE:
        x = ins[0]
        L = layout_of(x)
        d = _arg(args, kwargs, 1, "dim")
        if not L.known or d is None:
            return UNKNOWN
        dims = [_dim(d, x.ndim)] if isinstance(d, int) else [_dim(e, x.ndim) for e in d]
        if L.dim in dims:
            return UNKNOWN
        keep = bool(_arg(args, kwargs, 2, "keepdim", False))
        return L if keep else Layout(L.dim - sum(e < L.dim for e in dims), L.samples, L.rows)
    if func in _MATMUL:
        a, b = (ins[1], ins[0]) if func is torch.Tensor.__rmatmul__ else (ins[0], ins[1])
        for t, lead in ((a, 1), (b, 2)):
            L = layout_of(t)
            if not is_default(t, L) and L.known and t.ndim == out.ndim and L.dim < t.ndim - lead:
                return L
        return UNKNOWN
    if func in _CAT or func in _STACK:
        seq = args[0] if args else kwargs.get("tensors")
        d = _dim(_arg(args, kwargs, 1, "dim", 0), out.ndim if func in _STACK else seq[0].ndim)
        Ls = {layout_of(t) for t in seq}
        if len(Ls) != 1:
            return UNKNOWN
        L = Ls.pop()
        if not L.known or (func in _CAT and d == L.dim):
            return UNKNOWN
        return Layout(L.dim + (func in _STACK and d <= L.dim), L.samples, L.rows)
    return UNKNOWN


def _carried(ins, out: Tensor) -> Layout:
    """The one non-default layout among ``ins`` that maps to ``out`` row by row (broadcast
    operands aligned from the right), or :data:`UNKNOWN`."""
    found: Optional[Layout] = None
    for t in ins:
        L = layout_of(t)
        if t.ndim == 0 or is_default(t, L):
            continue  # the convention: an exact layout among the inputs takes precedence
        k = out.ndim - t.ndim
        if not L.known or k < 0 or out.shape[L.dim + k] != t.shape[L.dim]:
            return UNKNOWN
        M = Layout(L.dim + k, L.samples, L.rows)
        if found is not None and found != M:
            return UNKNOWN
        found = M
    if found is None:
        return Layout(0, out.shape[0], 1) if out.ndim else UNKNOWN
    return found


# ------------------------------------------------------------------ from the autograd graph
#: autograd nodes of reshapes that save their input's sizes
_GRAPH_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                   "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4")


def graph_layout(t: Tensor) -> Optional[Layout]:
    """``t``'s layout from its autograd graph (for a tensor made before the capture was active):
    the chain of reshape / permutation nodes that produced it, replayed from the tensor they start
    at (default layout). ``None`` if ``t`` has no such chain (no graph, or no shape operation)."""
    node, shape = t.grad_fn, tuple(t.shape)
    steps = []
    while node is not None:
        name = type(node).__name__
        if name in _GRAPH_RESHAPES:
            ins = tuple(node._saved_self_sym_sizes)
            steps.append((ins, shape, None))
        elif name == "UnsqueezeBackward0":
            d = _dim(node._saved_dim, len(shape))
            ins = shape[:d] + shape[d + 1:]
            steps.append((ins, shape, None))
        elif name == "TransposeBackward0":
            n = len(shape)
            p = list(range(n))
            a, b = _dim(node._saved_dim0, n), _dim(node._saved_dim1, n)
            p[a], p[b] = p[b], p[a]
            ins = tuple(shape[p.index(i)] for i in range(n))
            steps.append((ins, shape, p))
        elif name == "PermuteBackward0":
            n = len(shape)
            p = [_dim(d, n) for d in node._saved_dims]
            ins = tuple(shape[p.index(i)] for i in range(n))
            steps.append((ins, shape, p))
        elif name != "CloneBackward0":
            break
        else:
            ins = shape
        shape = ins
        node = node.next_functions[0][0] if node.next_functions else None
    if not steps or len(shape) < 2:
        return None
    L = Layout(0, shape[0], 1)
    for ins, out, p in reversed(steps):
        L = reshaped(ins, L, out) if p is None else permuted(L, p)
    return L


# ------------------------------------------------------------------ per-sample views
def per_sample(t: Tensor, L: Layout) -> Tensor:
    """``t`` with its samples in dimension 0: ``[N, ...]`` (``[N, m, ...]`` for ``m`` rows)."""
    if L.dim:
        t = t.movedim(L.dim, 0)
    if L.rows > 1:
        t = t.unflatten(0, (L.samples, L.rows))
    return t


def restore(t: Tensor, L: Layout) -> Tensor:
    """The inverse of :func:`per_sample`."""
    if L.rows > 1:
        t = t.flatten(0, 1)
    if L.dim:
        t = t.movedim(0, L.dim)
    return t


def per_sample_shape(shape: Sequence[int], L: Layout) -> Tuple[int, ...]:
    """The shape :func:`per_sample` gives a tensor of ``shape`` (``shape[L.dim]`` may be 1: a
    broadcast operand, then the samples' dimensions are 1 too)."""
    s = list(shape)
    d = s.pop(L.dim)
    lead = [d] if L.rows == 1 else ([1, 1] if d == 1 else [L.samples, L.rows])
    return tuple(lead + s)


__all__ = ["Layout", "UNKNOWN", "layout_of", "is_default", "reshaped", "permuted", "propagate", "graph_layout",
           "per_sample", "restore", "per_sample_shape", "SHAPE_OPS", "ATTR"]
