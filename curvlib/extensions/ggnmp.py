"""GGNMP: block-diagonal GGN / Fisher matrix products, and the whole-network operator.

For a weight with per-sample gradients ``X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T`` of the
curvature source (``k`` the ``K`` cotangent columns, ``n`` the ``N`` samples, ``t`` the
``T`` weight-sharing positions; see :mod:`curvlib.engine.capture`), the curvature block is
``C = sum_{k,n} vec(X_{k,n}) vec(X_{k,n})^T`` and

    C v = sum_{k,n} c_{kn} X_{k,n},     c_{kn} = <X_{k,n}, V> = sum_t s_{knt}^T V a_{nt}

Two ways to apply it (``B`` columns ``V``, weight viewed as ``[D_s, D_a]``):

- factored (default): ``V a`` then ``c``, then ``u = sum_k c s`` then ``u^T a``;
  ``~ 2 B N T D_s D_a`` flops per product, no extra memory;
- materialised: ``X`` as ``[K N, D_s D_a]``; ``~ 2 B K N D_s D_a`` flops per product,
  after building ``X`` once (``K N T D_s D_a`` flops, ``K N D_s D_a`` memory).

Materialising pays off only when ``K < T`` (convolutions with many positions and few
columns), and only after ``m* = K T / (T - K)`` products. ``mode="auto"`` therefore uses
the factored form first and materialises once ``m*`` products were made (ski-rental rule:
at most twice the cost of the better choice in hindsight), provided ``X`` holds no more
entries than the captured ``a`` and ``s`` together. Biases keep ``x_{kn} = sum_t s'_{knt}``
(``[K, N, D_out]``): ``C v = sum_{k,n} x (x^T v)``.

Memory: the extension keeps the captured ``a`` (unfolded patches for convolutions) and
``s`` of every layer (views, no copies) until its next context.

With ``fisher_type="type-2"`` the source is the exact loss-Hessian square root, so ``C`` is
the GGN block of the loss and ``p.ggnmp`` equals BackPACK's ``GGNMP`` product (Dangel et
al. 2020, "BackPACK: Packing more into backprop"); ``"mc"`` and ``"empirical"`` give the MC
and empirical Fisher blocks. The whole-network operator
(:class:`curvlib.extensions.operator.GGNOperator`) couples the blocks through ``c_{kn}``
summed over layers (all layers share the ``(k, n)`` index: one batched backprop).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import outer_sum
from curvlib.engine.layers.base import WeightMap
from curvlib.engine.lazy_columns import LazyColumns
from curvlib.extensions.base import Extension
from curvlib.extensions.operator import GGNOperator, ParameterOperator, SumOperator, inner_sum

MODES = ("auto", "factored", "materialized")


def _flat_view(s: Tensor) -> Tuple[Tensor, str]:
    """``s [K, N, T, D_s]`` -> ``[K, N, T D_s]`` without copying where the memory layout
    allows, with the order of the merged axes: ``"t s"`` or ``"s t"`` (convolution
    cotangents are stored channel-first)."""
    K, N = s.shape[:2]
    if _mergeable(s, 2, 3):
        return s.view(K, N, -1), "t s"
    if _mergeable(s, 3, 2):
        return s.transpose(2, 3).view(K, N, -1), "s t"
    return s.reshape(K, N, -1), "t s"


def _mergeable(s: Tensor, outer: int, inner: int) -> bool:
    """Whether dimensions ``outer`` then ``inner`` of ``s`` merge into one by a view (checked on
    the strides: a failed ``view`` raises, which costs more than the product it precedes)."""
    n_out, n_in = s.shape[outer], s.shape[inner]
    return n_out == 1 or n_in == 1 or s.stride(outer) == s.stride(inner) * n_in


class _BlockProducts:
    """``product`` from ``inner`` and ``expand`` (of :class:`LayerFactors` and :class:`TiedFactors`)."""

    params: Dict[str, nn.Parameter]
    module: object

    def product(self, name: str, V: Tensor) -> Tensor:
        """Block product ``[B, *p.shape] -> [B, *p.shape]``."""
        p = self.params[name]
        if V.ndim != p.ndim + 1 or V.shape[1:] != p.shape:
            raise ValueError(
                f"curvlib: {name}.ggnmp of {self.module} expects [V, *{tuple(p.shape)}], got "
                f"{tuple(V.shape)} (add a leading dimension for one vector: v.unsqueeze(0))."
            )
        with torch.no_grad():
            return self.expand(name, self.inner(name, V))


class LayerFactors(_BlockProducts):
    """One layer's per-sample factorisation of the curvature source, with products.

    Holds the captured ``a [N, T, D_a]`` and ``s [K, N, T, D_s]`` (as views, no copies),
    bias vectors ``x [K N, D_out]`` and, once materialised, ``X [K N, p.numel()]``.
    Product coefficients ``c_{kn}`` have the layout ``[K, N, B]``.

    Args:
        capture: the layer's capture; ``source`` the curvature source key.
        mode: ``"auto"``, ``"factored"`` or ``"materialized"`` (module docstring).

    Attributes:
        params: ``{"weight": p, "bias": p}`` (the parameters with curvature).
        num_columns: ``K``; ``batch_size``: ``N``; ``order``: forward order of the call.
    """

    def __init__(self, capture: LayerCapture, source, mode: str = "auto"):
        self.module = capture.module
        self.params: Dict[str, nn.Parameter] = capture.params
        self.order = capture.order
        self.orientation = capture.orientation
        self.batch_size = capture.batch_size
        self.mode = mode
        self.a: Optional[Tensor] = None
        self.s: Optional[Tensor] = None
        self.xb: Optional[Tensor] = None
        self.xw: Optional[Tensor] = None  # a summed weight (norm-layer scale): like a bias
        self.X: Optional[Tensor] = None
        self.map: Optional[WeightMap] = None  # the layer's own kernels for V a and u a^T
        self._capture: Optional[LayerCapture] = None
        self._products = 0
        self.source = source
        #: matrix-free columns (:mod:`curvlib.engine.lazy_columns`): products by a JVP and a VJP
        #: through the network instead of stored ``s``, until the ski-rental rule stores them
        self.lazy: Optional[LazyColumns] = None
        lazy = capture.lazy_columns(source)
        if lazy is not None and not any(capture.summed(n) and n != "bias" for n in self.params):
            if "weight" not in self.params or not capture.structure().grouped:
                self.lazy, self._capture = lazy, capture
                self.num_columns = lazy.num_columns(source)
                if "weight" in self.params:
                    self.map = capture.adapter.weight_map(capture.module, capture.x)
                return
        self._init_stored(capture, source)

    def _init_stored(self, capture: LayerCapture, source) -> None:
        """The stored factorisation: ``s`` (and ``a`` or the weight map), bias vectors."""
        mode = self.mode
        K, grouped = None, False
        if "weight" in self.params and capture.summed("weight"):
            xw = capture.sum_cot("weight", source).sum(2)  # [K, N, numel]
            K = xw.shape[0]
            self.xw = xw.reshape(-1, xw.shape[-1])
        elif "weight" in self.params:
            grouped = capture.structure().grouped
            if not grouped and len(capture.calls) == 1:
                self.map = capture.adapter.weight_map(capture.module, capture.x)
            self._capture = capture
            self.s = capture.cot(source)
            K, _, self.T, self.D_s = self.s.shape
            self._s3, self._merged = _flat_view(self.s)  # [K, N, T D_s]
            if self.map is not None and self._merged != "s t":  # the map's output order
                self._s3, self._merged = self.s.transpose(2, 3).reshape(K, self.batch_size, -1), "s t"
            self.D_a = self.params["weight"].numel() // self.D_s
            if self.map is None:
                self.a = capture.act()
        if "bias" in self.params:
            xb = capture.bias_cot(source).sum(2)  # [K, N, D_out]
            K = xb.shape[0]
            self.xb = xb.reshape(-1, xb.shape[-1])
        self.num_columns = K
        if self.s is not None and grouped:
            # grouped convolution: the per-sample gradients are not one outer product sum
            self.X = capture.per_sample_grads_into("weight", source).flatten(1)
        elif mode == "materialized" and self.s is not None:
            self._materialize()

    # ------------------------------------------------------------ weight helpers
    def _materialize(self) -> None:
        """``X[(k n), :] = vec(sum_t s_{knt} a_{nt}^T)`` (or its transpose, left side)."""
        K, N, _, D_s = self.s.shape
        if self.a is None:
            self.a = self._capture.act()
        out = self.s.new_empty(K * N, D_s * self.a.shape[-1])
        self.X = outer_sum(self.s, self.a, self.orientation, out)

    def _use_materialized(self, B: int) -> bool:
        """Ski-rental rule of ``mode="auto"`` (module docstring); counts products."""
        if self.X is not None:
            return True
        if self.mode != "auto":
            return False
        K, N, T, D_s = self.s.shape
        self._products += B
        if K >= T or K * N * D_s * self.D_a > N * T * self.D_a + self.s.numel():
            return False
        if self._products > K * T / (T - K):
            self._materialize()
            return True
        return False

    def _weight_inner(self, V: Tensor) -> Tensor:
        B = V.shape[0]
        K, N, T, D_s = self.s.shape
        if self._use_materialized(B):
            return (self.X @ V.reshape(B, -1).T).reshape(K, N, B)
        if self.map is not None:
            Va = self.map.forward(V)  # [N, B, D_s T]: the layer's kernel on its input
        else:
            a2 = self.a.reshape(-1, self.a.shape[-1])  # [N T, D_a]
            # all B columns in one GEMM: (V_b a_{nt}) (right) or (V_b^T a_{nt}) (left)
            Va = self.orientation.weight_times_act(a2, V, D_s)  # [N T, B D_s]
            Va = rearrange(Va, f"(n t) (b s) -> n b ({self._merged})", n=N, b=B)  # [N, B, T D_s]
        sn = self._s3.transpose(0, 1)  # [N, K, T D_s]
        if B <= 4:  # few columns: the row-vector bmm is the fast kernel
            return torch.bmm(Va, sn.transpose(1, 2)).permute(2, 0, 1)
        return torch.bmm(sn, Va.transpose(1, 2)).transpose(0, 1)  # [K, N, B]

    def _weight_expand(self, c: Tensor) -> Tensor:
        K, N, B = c.shape
        shape = self.params["weight"].shape
        if self.X is not None:
            return (c.reshape(K * N, B).T @ self.X).reshape(B, *shape)
        u = torch.bmm(c.permute(1, 2, 0), self._s3.transpose(0, 1))  # [N, B, T D_s] = sum_k c s
        if self.map is not None:
            return self.map.backward(u)  # sum_n of the weight gradients of u_n
        a2 = self.a.reshape(-1, self.a.shape[-1])
        m, D_s, o = self._merged, self.D_s, self.orientation
        # sum_{n,t} u a^T in the weight's orientation: [B, D_s, D_a] or [B, D_a, D_s]
        u = rearrange(u, f"n b ({m}) -> {o.outer_pattern('(n t)')}", s=D_s)
        return o.outer_to_weight(u, a2, B).reshape(B, *shape)

    # ------------------------------------------------------------ matrix-free columns
    def _store(self) -> None:
        """Ski-rental rule of the matrix-free columns: after ``K / 2`` directions (about the cost
        of the ``K`` stored columns), form the columns (``K`` VJPs) and take the stored path."""
        capture, self.lazy = self._capture, None
        self._init_stored(capture, self.source)

    def _adjoint(self, name: str, B: int, s: Tensor) -> Tensor:
        """The output-shaped ``U [B, *output.shape]`` whose cotangent vectors (the adapter's
        ``weight_cotangents`` / ``bias_cotangents``, a layout map) are ``s``: its adjoint."""
        cap = self._capture
        fn = cap.adapter.bias_cotangents if name == "bias" else cap.adapter.weight_cotangents
        g = s.new_zeros((B,) + tuple(self.lazy.out_shape)).requires_grad_(True)
        with torch.enable_grad():  # (plain autograd: torch.func.vjp costs 0.2 ms more a call)
            out = fn(cap.module, g, cap.x)
            return torch.autograd.grad(out, g, s.expand(out.shape))[0]

    def _lazy_directions(self, name: str, V: Tensor) -> Tensor:
        """Parameter directions ``V [B, *p.shape]`` -> output directions ``J_p V [B, *output.shape]``."""
        B, cap = V.shape[0], self._capture
        if name == "bias":
            return self._adjoint("bias", B, V.reshape(B, 1, 1, -1))
        if self.map is not None:  # [N, B, D_s T] in the output's memory order
            return self.map.forward(V).transpose(0, 1).reshape((B,) + tuple(self.lazy.out_shape))
        a, o = cap.act(), self.orientation
        D_s = self.params["weight"].numel() // a.shape[-1]
        Va = o.weight_times_act(a.reshape(-1, a.shape[-1]), V, D_s)  # [N T, B D_s]
        return self._adjoint("weight", B, rearrange(Va, "(n t) (b s) -> b n t s", n=a.shape[0], b=B))

    def _lazy_from_output(self, name: str, U: Tensor) -> Tensor:
        """Output-shaped ``U [B, *output.shape]`` -> ``J_p^T U [B, *p.shape]`` (summed over samples)."""
        B, cap, p = U.shape[0], self._capture, self.params[name]
        if name == "bias":
            return cap.adapter.bias_cotangents(cap.module, U, cap.x).sum((1, 2)).reshape(B, *p.shape)
        if self.map is not None:
            return self.map.backward(U.reshape(B, self.batch_size, -1).transpose(0, 1))
        s = cap.adapter.weight_cotangents(cap.module, U, cap.x)  # [B, N, T, D_s]
        M = torch.einsum("bnts,nta->bsa", s, cap.act())  # [B, D_s, D_a]
        return self.orientation.from_cot_act(M).reshape(B, *p.shape)

    # ------------------------------------------------------------------ public
    def inner(self, name: str, V: Tensor) -> Tensor:
        """``c[k, n, b] = <X_{k,n}, V_b>`` for ``V`` of shape ``[B, *p.shape]`` -> ``[K, N, B]``."""
        if self.lazy is not None and self.lazy.directions + V.shape[0] > self.num_columns / 2:
            self._store()
        if self.lazy is not None:
            return self.lazy.inner(self.source, self._lazy_directions(name, V))
        if name == "weight" and self.xw is None:
            return self._weight_inner(V)
        B = V.shape[0]
        x = self.xw if name == "weight" else self.xb
        return (x @ V.reshape(B, -1).T).reshape(-1, self.batch_size, B)

    def expand(self, name: str, c: Tensor) -> Tensor:
        """``sum_{k,n} c[k, n, b] X_{k,n}`` -> ``[B, *p.shape]``."""
        if self.lazy is not None:
            return self._lazy_from_output(name, self.lazy.expand(self.source, c))
        if name == "weight" and self.xw is None:
            return self._weight_expand(c)
        B = c.shape[-1]
        x = self.xw if name == "weight" else self.xb
        return (c.reshape(-1, B).T @ x).reshape(B, *self.params[name].shape)

    def inner_all(self, V: Dict[str, Tensor]) -> Tensor:
        """``sum_name inner(name, V[name])`` over parameters of this layer (one JVP for all of
        them when the columns are matrix-free: the output directions add up first)."""
        B = next(iter(V.values())).shape[0]
        if self.lazy is not None and self.lazy.directions + B > self.num_columns / 2:
            self._store()
        if self.lazy is not None:
            U = sum(self._lazy_directions(name, v) for name, v in V.items())
            return self.lazy.inner(self.source, U)
        return inner_sum(self, V)

    def expand_all(self, names: List[str], c: Tensor) -> Dict[str, Tensor]:
        """``{name: expand(name, c)}`` (one VJP for all of them when the columns are matrix-free)."""
        if self.lazy is not None:
            U = self.lazy.expand(self.source, c)
            return {name: self._lazy_from_output(name, U) for name in names}
        return {name: self.expand(name, c) for name in names}


class TiedFactors(_BlockProducts):
    """The factorisation of a parameter used by several layers (weight tying,
    :mod:`curvlib.engine.tying`): its per-sample gradient is the sum of its uses',
    ``X_{k,n} = sum_u X^(u)_{k,n}``, so ``c_{kn} = <X_{k,n}, V> = sum_u <X^(u)_{k,n}, V>`` and
    ``sum_{k,n} c_{kn} X_{k,n} = sum_u sum_{k,n} c_{kn} X^(u)_{k,n}``: products through each use's
    :class:`LayerFactors` (no per-sample gradients formed), exact with the cross terms between
    the uses. Same interface as :class:`LayerFactors` (:class:`~curvlib.extensions.operator.FactorBlock`).

    Args:
        capture: the tied parameter's capture; ``uses``: ``[(LayerFactors, name), ...]`` of its
            uses (each restricted to the parameter, named ``name`` there).
    """

    def __init__(self, capture: LayerCapture, uses: List[Tuple[LayerFactors, str]]):
        self.module = capture.module
        self.params: Dict[str, nn.Parameter] = capture.params
        self.order = capture.order
        self.batch_size = capture.batch_size
        self.uses = uses
        (self.name,) = self.params
        cols = {f.num_columns for f, _ in uses}
        if len(cols) != 1:
            raise RuntimeError(
                f"curvlib: the uses of {self.module} got {sorted(cols)} cotangent columns; the "
                "products need one (column, sample) index. Please report this with the model."
            )
        (self.num_columns,) = cols

    def inner(self, name: str, V: Tensor) -> Tensor:
        """``c[k, n, b] = sum_u <X^(u)_{k,n}, V_b>`` ``[K, N, B]``."""
        return functools.reduce(torch.add, [f.inner(n, V) for f, n in self.uses])

    def expand(self, name: str, c: Tensor) -> Tensor:
        """``sum_u sum_{k,n} c[k, n, b] X^(u)_{k,n}`` ``[B, *p.shape]``."""
        return functools.reduce(torch.add, [f.expand(n, c) for f, n in self.uses])


class GGNMP(Extension):
    """Block GGN / Fisher products ``p.ggnmp: [V, *p.shape] -> [V, *p.shape]``, and the
    whole-network operator :meth:`operator` (module docstring for the math).

    ``p.ggnmp(V)`` maps ``V`` ``[B, *p.shape]`` (``B`` vectors shaped like ``p``; one vector:
    ``v.unsqueeze(0)``) to ``C_pp V`` ``[B, *p.shape]``, ``C_pp`` the curvature block of ``p``
    (BackPACK's ``GGNMP`` convention). ``ext.operator()`` is the whole-network operator
    ``C`` (all blocks and cross-layer terms) over ``F.params`` (the extended parameters, forward
    order, weight before bias): ``F(list of tensors shaped like F.params)`` returns the same,
    ``F @ v`` / ``F.matvec_flat(v)`` act on flat vectors, ``F.to_scipy()`` gives a scipy
    ``LinearOperator``. No further pass through the model is needed.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.
    With ``"type-2"`` (the default) ``C`` is the exact GGN of the loss.

    Products are valid until the next context with this extension; several backwards in one
    context (gradient accumulation) sum their products.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN of the loss; BackPACK's GGNMP), ``"mc"`` or
            ``"empirical"``.
        mc_samples: sampled targets per datum for ``"mc"``.
        lazy_columns: with ``mode="auto"``, let the engine leave the columns of early layers
            unstored where its cost model prefers products through the network (exact; module
            docstring and :mod:`curvlib.engine.lazy_columns`). ``False``: always store them.
        mode: ``"auto"`` (factored, materialising per-sample gradients when that becomes
            cheaper), ``"factored"`` or ``"materialized"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import GGNMP
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> ext = GGNMP(fisher_type="type-2")
        >>> with curvature(ext):
        ...     loss_fn(model(x), y).backward()
        >>> W = model[0].weight                  # [3, 4]
        >>> W.ggnmp(torch.randn(5, 3, 4)).shape  # 5 vectors shaped like W
        torch.Size([5, 3, 4])
        >>> F = ext.operator()                   # all blocks and cross-layer terms
        >>> [v.shape for v in F([torch.randn_like(p) for p in F.params])]
        [torch.Size([3, 4]), torch.Size([3]), torch.Size([2, 3]), torch.Size([2])]
    """

    savefield = "ggnmp"
    exact_type2 = True
    #: several backwards in one context: products and operator summed over them
    accumulation = "custom"

    def __init__(self, fisher_type: str = "type-2", mc_samples: int = 1, mode: str = "auto", lazy_columns: bool = True):
        super().__init__(fisher_type, mc_samples)
        if mode not in MODES:
            raise ValueError(f"curvlib: GGNMP(mode={mode!r}) is not one of {MODES}.")
        self.mode = mode
        self.lazy_columns = bool(lazy_columns) and mode == "auto"
        #: one ``{layer: LayerFactors}`` per backward of the last context
        self._backwards: List[Dict[nn.Module, LayerFactors]] = []

    @property
    def _blocks(self) -> Dict[nn.Module, LayerFactors]:
        """The layer factors of the last backward."""
        return self._backwards[-1] if self._backwards else {}

    def begin(self) -> None:
        self._backwards = []

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        if not capture.params:
            return {}
        if capture.uses is not None:  # a tied parameter: the sum over its uses
            block = TiedFactors(capture, [(LayerFactors(u, self.source, self.mode), n) for u, n in capture.uses])
        else:
            block = LayerFactors(capture, self.source, self.mode)
        while len(self._backwards) <= capture.backward:
            self._backwards.append({})
        self._backwards[capture.backward][capture.module] = block
        return {name: _BlockProduct([block], name) for name in block.params}

    def accumulate(self, capture, name, old, new, counts):
        """The block of the concatenated batch is the sum of the micro-batches' blocks."""
        return _BlockProduct(old.blocks + new.blocks, name)

    def operator(self) -> ParameterOperator:
        """The whole-network operator of the last context: all extended parameters, in
        forward order of the layers, weight before bias (``F.params``); with several
        backwards in the context, the sum of their operators."""
        ops = [
            GGNOperator(sorted(blocks.values(), key=lambda b: b.order))
            for blocks in self._backwards
            if blocks
        ]
        if not ops:
            return GGNOperator([])  # raises the "no layer factors" error
        return ops[0] if len(ops) == 1 else SumOperator(ops)


class _BlockProduct:
    """``p.ggnmp``: ``V [B, *p.shape] -> C_pp V`` (the block of one parameter; summed over
    the backwards of its context)."""

    def __init__(self, blocks: List[LayerFactors], name: str):
        self.blocks, self.name = blocks, name

    @property
    def block(self) -> LayerFactors:
        return self.blocks[-1]

    def __call__(self, V: Tensor) -> Tensor:
        out = self.blocks[0].product(self.name, V)
        for b in self.blocks[1:]:
            out = out + b.product(self.name, V)
        return out

    def __repr__(self) -> str:
        return f"ggnmp({self.name} of {self.blocks[0].module})"


__all__ = ["GGNMP", "LayerFactors", "TiedFactors"]
