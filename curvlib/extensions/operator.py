"""Whole-network curvature operators: linear maps on lists of parameter-shaped tensors.

An operator ``C`` over parameters ``params = [p_1, ..., p_L]`` (all blocks *and* the
cross-parameter terms) acts on

- a list ``[v_1, ..., v_L]`` with ``v_i.shape == p_i.shape``  -> list of the same shapes;
- a batched list ``[V_1, ..., V_L]`` with ``V_i.shape == [B, *p_i.shape]`` -> batched list
  (``B`` products at once, :meth:`ParameterOperator.matmat`);
- a flat vector ``[P]`` or matrix ``[P, B]`` (``P = sum_i p_i.numel()``, entries in
  ``torch.cat([p.flatten() for p in params])`` order) via :meth:`matvec_flat` / ``C @ v``;
- numpy vectors via :meth:`to_scipy` (a ``scipy.sparse.linalg.LinearOperator``).

:class:`GGNOperator` is the GGN / Fisher ``U^T U`` of per-sample gradients, applied from
the captured factorisations without another pass through the network (built by
:meth:`curvlib.extensions.ggnmp.GGNMP.operator`); the Hessian operator lives in
:mod:`curvlib.extensions.hmp`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn


class ParameterOperator:
    """Base class: a symmetric linear operator on (lists of) parameter-shaped tensors.

    Subclasses implement :meth:`matmat` on batched lists ``[B, *p.shape]``.

    Attributes:
        params: the parameters, in the operator's order (see the subclass).
    """

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params: List[nn.Parameter] = list(params)
        if not self.params:
            raise ValueError(f"curvlib: {type(self).__name__} got no parameters.")

    # ------------------------------------------------------------------ shape info
    @property
    def shapes(self) -> List[torch.Size]:
        return [p.shape for p in self.params]

    @property
    def numel(self) -> int:
        """``P``: the operator is ``P x P``."""
        return sum(p.numel() for p in self.params)

    @property
    def shape(self) -> tuple:
        return (self.numel, self.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    # ------------------------------------------------------------------ products
    def matmat(self, V: List[Tensor]) -> List[Tensor]:
        """``[B, *p.shape]`` per parameter -> ``[B, *p.shape]`` per parameter."""
        raise NotImplementedError

    def __call__(self, v: Sequence[Tensor]) -> List[Tensor]:
        """Apply to a list shaped like :attr:`params` (or a batched list ``[B, *p.shape]``)."""
        v = list(v)
        if len(v) != len(self.params):
            raise ValueError(
                f"curvlib: {type(self).__name__} acts on {len(self.params)} tensors (one per "
                f"parameter, shapes {[tuple(s) for s in self.shapes]}), got {len(v)}."
            )
        if all(t.shape == p.shape for t, p in zip(v, self.params)):
            return [r.squeeze(0) for r in self.matmat([t.unsqueeze(0) for t in v])]
        B = v[0].shape[0] if v[0].ndim else -1
        if all(t.ndim >= 1 and t.shape[0] == B and t.shape[1:] == p.shape for t, p in zip(v, self.params)):
            return self.matmat(v)
        raise ValueError(
            f"curvlib: {type(self).__name__} expects tensors shaped like its parameters "
            f"{[tuple(s) for s in self.shapes]} (or [B, *shape] for B products), got "
            f"{[tuple(t.shape) for t in v]}."
        )

    def matvec_flat(self, v: Tensor) -> Tensor:
        """``C v`` for a flat ``v`` of shape ``[P]`` (or ``[P, B]``: ``B`` columns at once)."""
        P = self.numel
        if v.ndim not in (1, 2) or v.shape[0] != P:
            raise ValueError(
                f"curvlib: {type(self).__name__}.matvec_flat expects a tensor [{P}] or [{P}, B], "
                f"got {tuple(v.shape)}."
            )
        cols = v.reshape(P, -1).T  # [B, P]
        parts = torch.split(cols, [p.numel() for p in self.params], dim=1)
        V = [t.reshape(-1, *p.shape) for t, p in zip(parts, self.params)]
        out = torch.cat([r.reshape(r.shape[0], -1) for r in self.matmat(V)], dim=1).T
        return out.reshape(v.shape)

    def __matmul__(self, v):
        if isinstance(v, Tensor):
            return self.matvec_flat(v)
        return self(v)

    def to_scipy(self, dtype: Optional[torch.dtype] = None):
        """A ``scipy.sparse.linalg.LinearOperator`` of shape ``[P, P]`` on numpy vectors
        (flat, :attr:`params` order); computations run in ``dtype`` (default: the
        parameters' dtype) on the parameters' device."""
        from curvlib.solvers import to_scipy

        return to_scipy(self, self.shapes, dtype=dtype or self.dtype, device=self.device)

    def to_dense(self, chunk: int = 256) -> Tensor:
        """The dense ``[P, P]`` matrix (``P / chunk`` batched products; small models only)."""
        P = self.numel
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        return torch.cat([self.matvec_flat(eye[:, i : i + chunk]) for i in range(0, P, chunk)], dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} parameters, {self.numel} x {self.numel})"


class FactorBlock(Protocol):
    """What :class:`GGNOperator` needs from one layer's per-sample factorisation
    ``X_{k,n}`` (see :class:`curvlib.extensions.ggnmp.LayerFactors`)."""

    params: dict
    num_columns: int  # K
    batch_size: int  # N

    def inner(self, name: str, V: Tensor) -> Tensor:
        """``c[k, n, b] = <X_{k,n}, V_b>`` for ``V`` of shape ``[B, *p.shape]`` -> ``[K, N, B]``."""

    def expand(self, name: str, c: Tensor) -> Tensor:
        """``sum_{k,n} c[k, n, b] X_{k,n}`` -> ``[B, *p.shape]``."""


class GGNOperator(ParameterOperator):
    """The whole-network curvature ``C = sum_{k,n} u_{kn} u_{kn}^T`` of one backward.

    ``u_{kn}`` is the concatenation over all parameters of the per-sample gradients
    ``vec(X^l_{kn})`` of the curvature source (``K`` columns per sample, shared by all
    layers since one batched backprop produced them), so that

        C v = sum_{k,n} u_{kn} c_{kn},      c_{kn} = sum_l <X^l_{kn}, v^l>

    (two factored contractions per layer, no pass through the network). For
    ``fisher_type="type-2"`` this is the GGN ``J^T H J`` of the loss; ``"mc"``: the MC
    Fisher; ``"empirical"``: the empirical Fisher (Martens 2020, "New insights and
    perspectives on the natural gradient method"; Schraudolph 2002 for GGN products).

    Attributes:
        params: parameters of the extended layers in forward order of the layers, weight
            before bias (``model.parameters()`` order for the usual models).
    """

    def __init__(self, blocks: Sequence[FactorBlock]):
        blocks = list(blocks)
        if not blocks:
            raise RuntimeError(
                "curvlib: no layer factors were captured; run loss.backward() inside "
                "`with curvature(ext):` before calling ext.operator()."
            )
        KN = {(b.num_columns, b.batch_size) for b in blocks}
        if len(KN) != 1:
            raise RuntimeError(
                "curvlib: the captured layers do not share one (column, sample) index "
                f"(K, N) in {sorted(KN)}: the whole-network operator needs all layers from "
                "one backward of one loss. Run one loss.backward() per curvature context."
            )
        (self.num_columns, self.batch_size), = KN
        self.blocks = blocks
        self._entries = [(b, name) for b in blocks for name in b.params]
        super().__init__([b.params[name] for b, name in self._entries])

    def matmat(self, V: List[Tensor]) -> List[Tensor]:
        per_block: Dict[int, Dict[str, Tensor]] = {}
        for (block, name), v in zip(self._entries, V):
            per_block.setdefault(id(block), {})[name] = v
        c = None
        for block in self.blocks:  # a layer's parameters together (one JVP if matrix-free)
            ci = _inner_all(block, per_block[id(block)])
            c = ci if c is None else c + ci
        out = {id(block): _expand_all(block, list(per_block[id(block)]), c) for block in self.blocks}
        return [out[id(block)][name] for block, name in self._entries]


def inner_sum(block, V: Dict[str, Tensor]) -> Tensor:
    """``sum_name block.inner(name, V[name])``: a layer's parameters in one coefficient."""
    c = None
    for name, v in V.items():
        ci = block.inner(name, v)
        c = ci if c is None else c + ci
    return c


def _inner_all(block, V: Dict[str, Tensor]) -> Tensor:
    return block.inner_all(V) if hasattr(block, "inner_all") else inner_sum(block, V)


def _expand_all(block, names: List[str], c: Tensor) -> Dict[str, Tensor]:
    if hasattr(block, "expand_all"):
        return block.expand_all(names, c)
    return {name: block.expand(name, c) for name in names}


class SumOperator(ParameterOperator):
    """``sum_i C_i`` of operators over the same parameters (e.g. the GGN of several
    micro-batches accumulated in one ``curvature`` context)."""

    def __init__(self, operators: Sequence[ParameterOperator]):
        operators = list(operators)
        params = operators[0].params
        for op in operators[1:]:
            if len(op.params) != len(params) or any(p is not q for p, q in zip(op.params, params)):
                raise RuntimeError(
                    "curvlib: the backwards accumulated in one curvature context reached "
                    "different extended parameters; the summed operator needs the same "
                    "parameters in every backward."
                )
        super().__init__(params)
        self.operators = operators

    def matmat(self, V: List[Tensor]) -> List[Tensor]:
        out = self.operators[0].matmat(V)
        for op in self.operators[1:]:
            out = [a + b for a, b in zip(out, op.matmat(V))]
        return out


__all__ = ["ParameterOperator", "GGNOperator", "FactorBlock", "SumOperator"]
