"""KFAC: Kronecker factors of the curvature blocks of each layer.

For a weight with per-position factorisation ``dW_n = sum_t s_{n,t} a_{n,t}^T``
(see :mod:`curvlib.engine.layers.base`) and curvature sources ``s`` scaled as in
:mod:`curvlib.engine.capture`::

    expand:  A = 1/(N T) sum_{n,t} a a^T            G = sum_{k,n,t} s s^T
    reduce:  A = 1/N sum_n abar abar^T (abar = mean_t a)   G = sum_{k,n} sbar sbar^T (sbar = sum_t s)

so that ``kron(G, A)`` approximates the block of ``p.flatten()`` (Martens & Grosse 2015;
Grosse & Martens 2016; Eschenhagen et al. 2023 for expand/reduce). On Linear layers with
``fisher_type="type-2"`` these are BackPACK's KFLR factors; on Linear and Conv layers
``kron(G, A)`` equals curvlinops' ``KFACLinearOperator`` block. For a transposed
convolution the activation side is the *first* factor (see its adapter).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch import Tensor

from curvlib.engine.capture import LayerCapture, Source
from curvlib.extensions.base import Extension
from curvlib.extensions.cross_kfac import CrossKFAC

KFAC_APPROX = ("expand", "reduce")


def _gram(x: Tensor) -> Tensor:
    """``x^T x`` for ``x`` of shape ``[M, D]``.

    For ``D >= 256`` the upper 2x2 blocks are computed and the lower-left block is
    mirrored: 3/4 of the flops of one ``matmul`` (~20% faster on CPU for D = 512).
    """
    D = x.shape[1]
    if D < 256:
        return x.T @ x
    h = D // 2
    a, b = x[:, :h], x[:, h:]
    out = x.new_empty(D, D)
    out[:h, :h] = a.T @ a
    ab = a.T @ b
    out[:h, h:] = ab
    out[h:, :h] = ab.T
    out[h:, h:] = b.T @ b
    return out


def _gram_rows(x: Tensor) -> Tensor:
    """``sum_r x_r x_r^T`` over all rows ``r`` of ``x`` ``[..., T, D]``.

    Position-major views of channel-major data (conv patches and output gradients, whose
    ``T`` axis is the contiguous one) are contracted per batch entry with one batched
    matmul instead of being copied into a ``[rows, D]`` matrix first.
    """
    if x.ndim >= 3 and x.shape[-2] > 1 and x.stride(-2) == 1 and x.stride(-1) != 1:
        xt = x.transpose(-1, -2).reshape(-1, x.shape[-1], x.shape[-2])  # [B, D, T], a view
        return torch.bmm(xt, xt.transpose(1, 2)).sum(0)
    return _gram(x.reshape(-1, x.shape[-1]))


def _block_gram(x: Tensor, blocks: int) -> Tensor:
    """``[B, m, m]``: the Gram matrices of the ``B`` contiguous slices of the last dimension
    of ``x`` ``[..., B m]`` (grouped convolutions: each group's own factor)."""
    xr = x.reshape(-1, blocks, x.shape[-1] // blocks)
    return torch.einsum("rbi,rbj->bij", xr, xr)


class KFAC(Extension):
    """Kronecker factors ``p.kfac = [G, A]`` per weight, ``[G]`` per bias.

    Shapes: for a weight of shape ``[out, in, *kernel]`` (viewed ``[out, -1]`` row-major),
    ``G`` is ``[out, out]`` and ``A`` ``[in * prod(kernel), in * prod(kernel)]``, so that
    ``torch.kron(G, A)`` ``[p.numel(), p.numel()]`` approximates the curvature block of
    ``p.flatten()``; a bias gets ``[G]`` with the same ``G`` ``[out, out]``. Transposed
    convolutions (weight ``[in, out, *kernel]``) get ``[A, G]``: the first factor is always
    over ``p.shape[0]``.

    Scaling (module docstring for weight sharing): ``A = 1/(N T) sum_{n,t} a a^T`` over the
    layer inputs ``a`` (``T`` positions per sample, ``1`` for a plain Linear);
    ``G = sum s s^T`` over the output-side vectors ``s`` of the ``fisher_type``, which carry the
    loss reduction: ``reduction="mean"`` over ``N`` samples gives ``G = 1/N sum_n ...``
    (``1/(N mc_samples)`` for ``"mc"``), ``"sum"`` the plain sum. On Linear layers type-2 equals
    BackPACK's ``KFLR`` and mc has the scaling of BackPACK's ``KFAC``; on Linear and Conv
    layers ``kron(G, A)`` equals curvlinops' ``KFACLinearOperator`` block.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN = Fisher of the loss's likelihood, columns of the
            loss-Hessian square root), ``"mc"`` (``mc_samples`` targets sampled from the model)
            or ``"empirical"`` (true-label gradients).
        mc_samples: sampled targets per datum, for ``"mc"`` only.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Eschenhagen et
            al. 2023).
        cross_layer: also build the cross-layer factors ``G_ij``, ``A_ij`` of all pairs of
            parameters (for the two-level ``"tpselepedis"`` coarse space); after the
            context they are in ``self.cross`` (a :class:`CrossKFAC`: ``cross_factors``,
            ``nested()``). Off by default: it keeps every layer's reduced vectors until
            the backward ends.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import KFAC
        >>> from curvlib.solvers import KroneckerInverse
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(KFAC(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> G, A = model[0].weight.kfac
        >>> G.shape, A.shape, torch.kron(G, A).shape
        (torch.Size([3, 3]), torch.Size([4, 4]), torch.Size([12, 12]))
        >>> [G.shape for G in model[0].bias.kfac]
        [torch.Size([3, 3])]
        >>> KroneckerInverse([[G, A]], damping=1e-3)(model[0].weight.grad).shape
        torch.Size([3, 4])
    """

    savefield = "kfac"
    exact_type2 = False
    accumulation = "custom"

    @property
    def coupled_samples(self) -> str:  # type: ignore[override]
        # KFAC approximates anyway (warned once); the cross-layer factors need independent samples
        return "raise" if self.cross is not None else "warn"

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        cross_layer: bool = False,
    ):
        super().__init__(fisher_type, mc_samples)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"curvlib: KFAC(kfac_approx={kfac_approx!r}) is not one of {KFAC_APPROX}.")
        self.kfac_approx = kfac_approx
        self.cross: Optional[CrossKFAC] = CrossKFAC(fisher_type, mc_samples) if cross_layer else None
        #: id(weight) -> index of its activation factor ``A`` in ``p.kfac`` (1 for ``[G, A]``,
        #: 0 for ``[A, G]``); ``A`` is a mean over rows, the other factors carry the loss scaling
        self.act_index: Dict[int, int] = {}

    def sources(self) -> Set[Source]:
        return super().sources() | (self.cross.sources() if self.cross else set())

    def begin(self) -> None:
        self.act_index = {}
        if self.cross:
            self.cross.begin()

    def finish(self) -> None:
        if self.cross:
            self.cross.finish()

    def count(self, capture: LayerCapture) -> int:
        """Rows averaged in ``A``: ``N T`` (expand) or ``N`` (reduce)."""
        if self.kfac_approx == "reduce" or "weight" not in capture.params or capture.summed("weight"):
            return capture.batch_size
        return capture.act_rows()

    def accumulate(self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]) -> Any:
        """``G`` adds up (the loss scaling is in ``s``); ``A`` is a mean over rows, so the
        combined ``A`` weights each backward's by its row count."""
        if capture.summed(name):
            return [old[0] + new[0]]
        n0, n1 = counts
        ia = 1 if capture.act_side == "right" else 0
        out = [None, None]
        out[1 - ia] = old[1 - ia] + new[1 - ia]
        out[ia] = (old[ia] * n0 + new[ia] * n1) / (n0 + n1)
        return out

    def _cot_factor(self, s: Tensor, blocks: int = 1) -> Tensor:
        if self.kfac_approx == "reduce":
            s = s.sum(2)
        return _gram_rows(s) if blocks == 1 else _block_gram(s, blocks)

    def _act_factor(self, a: Tensor, blocks: int = 1) -> Tensor:
        if self.kfac_approx == "reduce":
            a = a.mean(1)
        rows = a.shape[:-1].numel()
        return (_gram_rows(a) if blocks == 1 else _block_gram(a, blocks)).div_(rows)

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        params, src, out = capture.params, self.source, {}
        G = None
        if capture.adapter.summed_params:  # norm layers: exact blocks sum x x^T, x = sum_t s
            if self.cross:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support {capture.module} yet (a "
                    "norm layer has no Kronecker factors to cross); use cross_layer=False or "
                    "leave the layer's parameters out (requires_grad=False)."
                )
            for name in params:
                out[name] = [_gram_rows(capture.sum_cot(name, src).sum(2))]
            return out
        if "weight" in params and not capture.summed("weight"):
            B = capture.adapter.blocks(capture.module)  # grouped convolutions: block form
            G = self._cot_factor(capture.cot(src), B)
            A = capture.act_factor(self.kfac_approx)  # structured (Embedding: 1-D)
            if A is None:
                A = self._act_factor(capture.act(), B)
            out["weight"] = [G, A] if capture.act_side == "right" else [A, G]
            self.act_index[id(params["weight"])] = 1 if capture.act_side == "right" else 0
        if "bias" in params:
            sb = capture.bias_cot(src)
            if G is None or G.dim() == 3 or sb is not capture.cot(src):
                G = self._cot_factor(sb)
            out["bias"] = [G]
        if self.cross:
            if capture.adapter.blocks(capture.module) > 1:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support the grouped {capture.module} "
                    "yet; use cross_layer=False."
                )
            self.cross.compute(capture)
        return out
