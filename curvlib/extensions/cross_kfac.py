"""Cross-layer Kronecker factors ``F_ij ≈ G_ij ⊗ A_ij`` for every pair of parameter blocks.

For the two-level KFAC coarse space of Tselepidis, Kohler & Orvieto 2020 ("Two-level K-FAC
preconditioning for deep learning"): the coarse operator needs the cross-layer blocks of the
Fisher, approximated as Kronecker products of cross-layer factors. With the KFAC "reduce"
reduction over weight-sharing positions (Eschenhagen et al. 2023)::

    abar_n = mean_t a_{n,t}   [D_a]        sbar_{k,n} = sum_t s_{k,n,t}   [D_s]
    A_ij = (1/N) sum_n abar_i abar_j^T     G_ij = sum_{k,n} sbar_i sbar_j^T

so for ``i == j`` these are curvlib's ``KFAC(kfac_approx="reduce")`` factors. Only while this
extension is active, each layer keeps ``abar`` ``[N, D_a]`` and ``sbar`` ``[K*N, D_s]`` until
``finish()``, where all pairs come from two Gram matrices (one matmul each).

Indexing: blocks are *parameters*, in forward order of their layers (``ext.modules``), weight
before bias: ``ext.params[i]``, ``ext.names[i]`` (``"<layer index>.weight"``). A bias is a block
whose activation is the constant ``1`` (``abar = 1``, ``sbar = sum_t s'``), so bias pairs are
exact in ``A`` (``A_ij = mean_n abar_j^T`` with a weight, ``[[1]]`` with a bias); this is the
same as appending a ``1`` to ``a`` and splitting the layer block into weight and bias parts.

``ext.cross_factors[(i, j)] = (G_ij, A_ij)`` for all ordered pairs (``G_ji = G_ij^T``), with
``G_ij`` ``[D_s_i, D_s_j]`` (cotangent side) and ``A_ij`` ``[D_a_i, D_a_j]`` (activation side).
For Linear/Conv weights (``act_side == "right"``, weight ``[D_s, D_a]``) the block of
``p_i.flatten(), p_j.flatten()`` is ``kron(G_ij, A_ij)``; for transposed convolutions
(``"left"``, weight ``[D_a, D_s]``) the factors swap places. :meth:`CrossKFAC.nested` gives the
nested ``[i][j] = [first, second]`` list of :mod:`curvlib.solvers.two_level`.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import Orientation, common_orientation
from curvlib.extensions.base import Extension


class _Block(NamedTuple):
    name: str  # "weight" | "bias"
    orientation: Optional[Orientation]  # of a weight; None for a bias
    s: Tensor  # sbar [K*N, D_s] (the same tensor for a weight and a bias that share it)
    a: Optional[Tensor]  # abar [N, D_a]; None: the constant 1 of a bias


class CrossKFAC(Extension):
    """Cross-layer KFAC ("reduce") factors of all parameter pairs, built in ``finish()``.

    Results live on the extension, not on the parameters: its ``savefield`` ``"cross_kfac"``
    only reserves the name (no ``p.cross_kfac`` is written). After the context exits:
    ``modules`` (layers, forward order), ``params`` / ``names`` / ``act_sides`` (one entry per
    parameter block, weight before bias) and ``cross_factors[(i, j)] = (G_ij, A_ij)`` with
    ``G_ij`` ``[D_s_i, D_s_j]`` (output side, ``D_s = out``) and ``A_ij`` ``[D_a_i, D_a_j]`` (input
    side, ``D_a = in * prod(kernel)``; ``1`` for a bias), so that ``kron(G_ij, A_ij)``
    ``[p_i.numel(), p_j.numel()]`` approximates the cross block of ``p_i.flatten()``,
    ``p_j.flatten()`` (module docstring); :meth:`nested` gives the list form of
    :func:`curvlib.solvers.two_level_direction`. ``KFAC(cross_layer=True)`` runs one as
    ``kfac.cross``.

    Scaling: KFAC-reduce, ``A_ij = 1/N sum_n abar_i abar_j^T``, ``G_ij = sum sbar_i sbar_j^T`` with
    the loss reduction in ``sbar`` (``"mean"``: ``1/N``), so ``(G_ii, A_ii)`` are the factors of
    ``KFAC(kfac_approx="reduce")``.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: sampled targets per datum, for ``"mc"`` only.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import CrossKFAC
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> ext = CrossKFAC(fisher_type="type-2")
        >>> with curvature(ext):
        ...     loss_fn(model(x), y).backward()
        >>> ext.names
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> G02, A02 = ext.cross_factors[(0, 2)]  # layer-0 weight [3, 4] x layer-1 weight [2, 3]
        >>> G02.shape, A02.shape, torch.kron(G02, A02).shape
        (torch.Size([3, 2]), torch.Size([4, 3]), torch.Size([12, 6]))
    """

    savefield = "cross_kfac"
    exact_type2 = False  # "reduce" KFAC uses the shared-column type-2 source
    #: several backwards in one context: G_ij summed, A_ij weighted by the samples of each
    #: backward (built in finish(), nothing is stored on the parameters)
    accumulation = "custom"

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1):
        super().__init__(fisher_type, mc_samples)
        # (backward, forward order, layer, blocks)
        self._records: List[Tuple[int, int, nn.Module, List[_Block]]] = []
        self.modules: List[nn.Module] = []
        self.params: List[nn.Parameter] = []
        self.names: List[str] = []
        self.act_sides: List[Optional[str]] = []
        self.orientations: List[Optional[Orientation]] = []
        self.cross_factors: Dict[Tuple[int, int], Tuple[Tensor, Tensor]] = {}

    def begin(self) -> None:
        self._records = []

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        if len(capture.calls) > 1:
            raise NotImplementedError(
                f"curvlib: CrossKFAC does not support {capture.module}, which was called "
                f"{len(capture.calls)} times before one backward (its reduced vectors are per "
                "call); leave the layer out of the cross-layer factors or call it once."
            )
        src, params, blocks = self.source, capture.params, []
        if "weight" in params:
            s = capture.cot(src).sum(2).flatten(0, 1)
            blocks.append(_Block("weight", capture.orientation, s, capture.act().mean(1)))
        if "bias" in params:
            sb = capture.bias_cot(src)
            shared = "weight" in params and sb is capture.cot(src)
            blocks.append(_Block("bias", None, s if shared else sb.sum(2).flatten(0, 1), None))
        self._records.append((capture.backward, capture.order, capture.module, blocks))
        return {}

    def finish(self) -> None:
        records, self._records = self._records, []
        backwards = sorted({r[0] for r in records})
        per_backward = [sorted((r for r in records if r[0] == b), key=lambda r: r[1]) for b in backwards]
        first = per_backward[0] if per_backward else []
        self.modules = [m for _, _, m, _ in first]
        for other in per_backward[1:]:
            if [m for _, _, m, _ in other] != self.modules:
                raise RuntimeError(
                    "curvlib: CrossKFAC accumulates over the backwards of one curvature context "
                    "only if every backward reaches the same extended layers in the same order."
                )
        layer_blocks = [(li, m, b) for li, (_, _, m, bl) in enumerate(first) for b in bl]
        self.params = [getattr(m, b.name) for _, m, b in layer_blocks]
        self.names = [f"{li}.{b.name}" for li, _, b in layer_blocks]
        self.orientations = [b.orientation for _, _, b in layer_blocks]
        self.act_sides = [None if o is None else o.act_side for o in self.orientations]
        if not layer_blocks:
            self.cross_factors = {}
            return
        # G sums over backwards; A is a mean over samples: weight each backward by its N
        G = A = None
        N_total = 0
        for recs in per_backward:
            blocks = [b for _, _, _, bl in recs for b in bl]
            G_b, A_b, N, rows = self._grams(blocks)
            G = G_b if G is None else G + G_b
            A = A_b if A is None else A + A_b
            N_total += N
        A = A.div_(N_total)
        self.cross_factors = {
            (i, j): (G[si, sj], A[ai, aj])
            for i, (si, ai) in enumerate(rows)
            for j, (sj, aj) in enumerate(rows)
        }

    @staticmethod
    def _grams(blocks: List[_Block]) -> Tuple[Tensor, Tensor, int, List[Tuple[slice, slice]]]:
        """Unnormalised Gram matrices ``S^T S`` and ``A_in^T A_in`` of one backward, its ``N``
        and each block's (cotangent, activation) column ranges."""
        # one Gram matrix per side over all distinct vectors (a bias: a constant 1 column)
        s_vecs = list({id(b.s): b.s for b in blocks}.values())
        a_vecs = [b.a for b in blocks if b.a is not None]
        N = a_vecs[0].shape[0] if a_vecs else 1
        a_vecs.append(s_vecs[0].new_ones(N, 1))
        try:
            S, A_in = torch.cat(s_vecs, dim=1), torch.cat(a_vecs, dim=1)
        except RuntimeError as e:
            raise RuntimeError(
                "curvlib: CrossKFAC needs all extended layers to see the same batch in one "
                f"backward (got mismatched row counts: {e})."
            ) from None
        s_of = {id(v): sl for v, sl in zip(s_vecs, _slices(s_vecs))}
        a_sl = _slices(a_vecs)
        a_iter = iter(a_sl)
        rows = [(s_of[id(b.s)], a_sl[-1] if b.a is None else next(a_iter)) for b in blocks]
        return S.T @ S, A_in.T @ A_in, N, rows

    def nested(self) -> List[List[List[Tensor]]]:
        """``[i][j] = [F1, F2]`` with ``kron(F1, F2)`` the block of ``params[i].flatten(),
        params[j].flatten()``, as :mod:`curvlib.solvers.two_level` expects: ``[G, A]``, or
        ``[A, G]`` when a transposed-convolution weight is involved (a bias, ``vec = 1 ⊗ s =
        s ⊗ 1``, pairs either way)."""
        out = []
        for i, oi in enumerate(self.orientations):
            row = []
            for j, oj in enumerate(self.orientations):
                G, A = self.cross_factors[(i, j)]
                o = common_orientation(oi, oj)
                if o is None:
                    raise NotImplementedError(
                        f"curvlib: CrossKFAC.nested: the pair ({self.names[i]}, {self.names[j]}) "
                        "mixes a transposed-convolution weight with a Linear/Conv weight; its "
                        "block is not a Kronecker product in flatten order. Use cross_factors "
                        "directly (for a left-side j: F_ij vec(Z_j) = vec(G_ij Z_j^T A_ij^T)) "
                        "or leave the transposed convolution out of extend()."
                    )
                row.append(o.pair(G, A))
            out.append(row)
        return out


def _slices(tensors: List[Tensor]) -> List[slice]:
    """Column ranges of ``tensors`` in ``torch.cat(tensors, dim=1)``."""
    out, i = [], 0
    for t in tensors:
        out.append(slice(i, i + t.shape[1]))
        i += t.shape[1]
    return out


__all__ = ["CrossKFAC"]
