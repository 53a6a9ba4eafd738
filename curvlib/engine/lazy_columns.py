r"""Matrix-free curvature columns: products with ``s_k = J^T V_k`` at a layer output without
storing the ``s_k``.

The engine back-propagates the ``K`` loss cotangents ``V_k`` ``[K, *f.shape]`` (``f`` the loss
input) to every layer output and stores ``s_k = J^T V_k`` (:mod:`curvlib.engine.columns`), ``J``
the Jacobian of ``f`` w.r.t. the layer output. An exact GGN product (:class:`~curvlib.extensions.GGNMP`)
only reads them through, for output directions ``U_b``,

    inner:   c[k, n, b] = <s_{k,n}, U_{b,n}> = <V_{k,n}, (J U_b)_n>        (one JVP per b)
    expand:  sum_k c[k, n, b] s_{k,n} = (J^T Z_b)_n,  Z_b[n] = sum_k c[k, n, b] V_{k,n}   (one VJP)

(samples are independent: ``J`` is block diagonal over the batch). For an early layer behind an
expensive part of the network the ``K`` stored columns cost far more than a few such products:
on the CG-Newton example's CNN (``benchmarks/bench_cg_newton.py``, 1 thread) the columns of the
first convolution take 6.8 of the 7.6 ms of the column backward (each of the 9 crosses the second
convolution's input gradient, a max-pool and a sigmoid at 24x24), while building this operator
takes 0.8 ms and one product (JVP and VJP) 2.0 ms. BackPACK's ``GGNMP`` takes every block this way.

How, on the autograd graph (no second forward):

- during the backward (the graph is alive) one VJP with ``create_graph=True`` gives ``G(w) = J^T w``
  for a leaf ``w`` shaped like ``f``; its graph (double-backward nodes, which save what they need)
  outlives the backward;
- ``J u = d<G(w), u>/dw``: a backward through that graph (double backward);
- the first JVP is taken with a graph in ``u``: ``J u`` is linear in ``u``, so ``J^T z =
  d<J u, z>/du`` is a backward through it for every ``z`` (third-order nodes).

Only graphs whose operations between ``f`` and the layer output are known to support this
(:data:`SUPPORTED_NODES`: linear layers, convolutions, pooling, norm layers, the usual
activations, views and elementwise arithmetic) are taken; anything else keeps stored columns (same result).

When (:func:`plan`): only where the columns go through the backward one at a time (large
columns, :func:`curvlib.engine.columns.column_chunk`; batched columns cost far less each). The
engine then stores the columns of the layers from some call ``c`` on (in
forward order) and takes the earlier ones matrix-free, choosing ``c`` to minimise an estimate in
multiply-adds: ``K`` backwards from ``f`` to call ``c``'s output against ``(1 + 2 P_i)`` passes
through the network downstream of each matrix-free call ``i`` (one to build, a JVP and a VJP for
each of its ``P_i`` parameters: one product each, as block-diagonal CG-Newton with few
iterations makes). A backward through a layer costs its forward multiply-adds plus
:data:`ELEMENT_COST` per output entry (the elementwise operations around it) and
:data:`CALL_COST` per pass. Products beyond that are bounded by a ski-rental rule in
:class:`~curvlib.extensions.ggnmp.LayerFactors`: after ``K / 2`` directions the columns are formed
(``K`` VJPs through the stored graph) and stored products take over, so a mistaken choice costs at
most about twice the stored columns. The whole-network operator applies a layer's parameters
together: their output directions add up before one JVP, and one VJP serves them all.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch
from torch import Tensor, nn

Source = Hashable

#: multiply-add equivalents per layer-output entry of one backward (pooling, activation and copy
#: kernels around a layer; CG-Newton CNN, 1 thread: 0.42 ms per column of 368k entries at the
#: first convolution, against 0.33 ms for the 20.5M multiply-adds of the second one's input
#: gradient)
ELEMENT_COST = 64
#: multiply-add equivalents of one ``torch.autograd.grad`` call (Python and engine overhead)
CALL_COST = 2_500_000

#: backward nodes (``grad_fn`` names without the trailing version digit) whose double and triple
#: backward torch implements, so that the JVP and VJP of :class:`LazyColumns` can pass them
SUPPORTED_NODES = frozenset(
    """Addmm Mm Bmm Matmul T Transpose Permute View Reshape ReshapeAlias UnsafeView Expand Clone
    Squeeze Unsqueeze Select Slice Cat Stack Split SplitWithSizes Add Sub Mul Div Neg Sum Mean
    Sigmoid Tanh Relu Threshold LeakyRelu Gelu Silu Elu Softplus Hardtanh MaxPool2DWithIndices
    MaxPool3DWithIndices AvgPool2D AvgPool3D AdaptiveAvgPool2D AdaptiveAvgPool3D Convolution
    ConstantPadNd Softmax LogSoftmax Flatten NativeBatchNorm NativeLayerNorm NativeGroupNorm""".split()
)
_VERSION = re.compile(r"Backward\d*$")


def node_kind(node: Any) -> str:
    """``"ConvolutionBackward0"`` -> ``"Convolution"``."""
    return _VERSION.sub("", type(node).__name__)


def supported_between(f: Tensor, edges: Sequence[Any]) -> List[bool]:
    """For each gradient edge: whether every autograd node on a path from ``f`` to it is in
    :data:`SUPPORTED_NODES` (the edge's own node, the layer, is not crossed). One iterative
    post-order walk over the graph of ``f`` (no recursion: graphs may be thousands deep)."""
    if f.grad_fn is None:
        return [False] * len(edges)
    targets = {id(e.node): i for i, e in enumerate(edges)}
    ok = [True] * len(edges)
    reach: Dict[int, frozenset] = {}  # node -> the targets it reaches
    stack = [(f.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in reach:
            continue
        children = [nxt for nxt, _ in node.next_functions if nxt is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in reach)
            continue
        below = frozenset().union(*(reach.get(id(c), frozenset()) for c in children))
        if below and node_kind(node) not in SUPPORTED_NODES:
            for i in below:
                ok[i] = False
        reach[key] = below | ({targets[key]} if key in targets else frozenset())
    return ok


def forward_macs(module: nn.Module, out_numel: int) -> int:
    """Multiply-adds of a layer's forward (= of its input gradient): output entries times the
    entries of one weight row (linear, convolution); 0 for layers without a matrix weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.ndim < 2:
        return 0
    return out_numel * w[0].numel()


def plan(costs: Sequence[tuple], K: int, batched: bool = False) -> int:
    """The cut ``c`` (module docstring): calls ``0 .. c-1`` (forward order) matrix-free.

    Args:
        costs: per call in forward order ``(eligible, macs, out_numel, P)``: whether it may be
            matrix-free, its forward multiply-adds, its output entries and its parameters.
        K: columns per call.
        batched: whether the columns would go through the backward several at a time
            (:func:`curvlib.engine.columns.column_chunk` > 1: small columns, e.g. MLPs). Then
            ``0``: a batched backward costs far less per column than the estimate, and a
            matrix-free product (one direction per pass) loses (bench_ggnmp's MLP 784-256-128-10,
            batch 128: block products 0.85x BackPACK's stored, 0.96x matrix-free).
    """
    if batched:
        return 0
    n = len(costs)
    # backward cost from f down to the output of call i: the layers after it and the outputs
    # from i on
    back = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        nxt = costs[i + 1][1] if i + 1 < n else 0
        back[i] = back[i + 1] + nxt + ELEMENT_COST * costs[i][2]
    best, best_cost = 0, K * (back[0] + CALL_COST)
    lazy = 0.0
    for c in range(1, n + 1):
        eligible, _, _, P = costs[c - 1]
        if not eligible:
            break
        lazy += (1 + 2 * P) * (back[c - 1] + CALL_COST)
        stored = K * (back[c] + CALL_COST) if c < n else 0.0
        if lazy + stored < best_cost - 2 * CALL_COST:
            best, best_cost = c, lazy + stored
    return best


class LazyColumns:
    """The columns ``s_k = J^T V_k`` of one layer call as products (module docstring).

    Args:
        w, G: the leaf ``w`` (like ``f``) and ``G = J^T w`` with its graph.
        V: ``source -> [K, *f.shape]`` cotangents at ``f`` (as back-propagated).
        out_shape: the layer output's shape.

    Attributes:
        directions: output directions applied so far (:meth:`inner` and :meth:`expand` count
            once per direction pair; the ski-rental rule of ``LayerFactors`` reads it).
    """

    def __init__(self, w: Tensor, G: Tensor, V: Dict[Source, Tensor], out_shape: Sequence[int]):
        self.w, self.G = w, G
        self.V = {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in V.items()}  # [K, N, R]
        self.out_shape = torch.Size(out_shape)
        self.directions = 0
        self._u: Optional[Tensor] = None
        self._Ju: Optional[Tensor] = None
        self._columns: Dict[Source, Tensor] = {}

    def num_columns(self, source: Source) -> int:
        return self.V[source].shape[0]

    def jvp(self, U: Tensor) -> Tensor:
        """``[B, *out_shape] -> [B, *f.shape]``: ``J U_b``, one direction at a time (like the
        VJPs: ``is_grads_batched`` measured slower, 4 directions at the CG-Newton CNN's first
        convolution, 1 thread: JVPs 4.7 against 4.2 ms, VJPs 3.8 against 3.4 ms)."""
        out = []
        with torch.enable_grad():
            for u in U:
                if self._Ju is None:  # the first one with its graph in u (for vjp)
                    self._u = u.detach().clone().requires_grad_(True)
                    self._Ju = torch.autograd.grad(self.G, self.w, self._u, create_graph=True, retain_graph=True)[0]
                    out.append(self._Ju.detach())
                else:
                    out.append(torch.autograd.grad(self.G, self.w, u, retain_graph=True)[0])
        return torch.stack(out)

    def vjp(self, Z: Tensor) -> Tensor:
        """``[B, *f.shape] -> [B, *out_shape]``: ``J^T Z_b``."""
        if self._Ju is None:
            self.jvp(Z.new_zeros((1,) + tuple(self.out_shape)))
        with torch.enable_grad():
            return torch.stack([torch.autograd.grad(self._Ju, self._u, z, retain_graph=True)[0] for z in Z])

    def inner(self, source: Source, U: Tensor) -> Tensor:
        """``c[k, n, b] = <s_{k,n}, U_{b,n}>`` for ``U [B, *out_shape]`` -> ``[K, N, B]``."""
        self.directions += U.shape[0]
        V = self.V[source]
        JU = self.jvp(U).reshape(U.shape[0], V.shape[1], -1)
        return torch.einsum("knr,bnr->knb", V, JU)

    def expand(self, source: Source, c: Tensor) -> Tensor:
        """``sum_k c[k, n, b] s_{k,n}`` -> ``[B, *out_shape]``."""
        V = self.V[source]
        Z = torch.einsum("knb,knr->bnr", c, V)
        return self.vjp(Z.reshape((Z.shape[0],) + tuple(self.w.shape)))

    def columns(self, source: Source) -> Tensor:
        """The stored columns ``[K, *out_shape]`` (``K`` VJPs; cached)."""
        if source not in self._columns:
            V = self.V[source]
            self._columns[source] = self.vjp(V.reshape((V.shape[0],) + tuple(self.w.shape)))
        return self._columns[source]


def build(
    f: Tensor, edges: Sequence[Any], out_shapes: Sequence[Sequence[int]], V: Dict[Source, Tensor]
) -> List[Optional[LazyColumns]]:
    """One :class:`LazyColumns` per gradient edge (the graph of ``f`` must be alive), from one VJP
    with ``create_graph=True``; ``None`` for an edge that gets no graph in ``w`` (the layer output
    is ``f`` itself, or ``f`` does not depend on it): store its columns."""
    w = torch.zeros_like(f, requires_grad=True)
    with torch.enable_grad():
        Gs = torch.autograd.grad(f, list(edges), w, create_graph=True, retain_graph=True, allow_unused=True)
    return [
        None if G is None or G.grad_fn is None else LazyColumns(w, G, V, shape)
        for G, shape in zip(Gs, out_shapes)
    ]


__all__ = ["LazyColumns", "build", "plan", "supported_between", "forward_macs", "SUPPORTED_NODES"]
