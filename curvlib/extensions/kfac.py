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

from curvlib.engine import factors
from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.factors import KFAC_APPROX, structure
from curvlib.extensions.base import Extension
from curvlib.extensions.cross_kfac import CrossKFAC


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
        o = capture.orientation
        (G0, A0), (G1, A1) = o.unpair(old), o.unpair(new)
        return o.pair(G0 + G1, (A0 * n0 + A1 * n1) / (n0 + n1))

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        params, src, out = capture.params, self.source, {}
        G = None
        if factors.has_summed_params(capture):  # norm layers: exact blocks sum x x^T, x = sum_t s
            if self.cross:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support {capture.module} yet (a "
                    "norm layer has no Kronecker factors to cross); use cross_layer=False or "
                    "leave the layer's parameters out (requires_grad=False)."
                )
            for name in params:
                out[name] = [factors.kfac_summed_factor(capture, name, src)]
            return out
        if "weight" in params and not capture.summed("weight"):
            # dense, diagonal-times-dense (Embedding: 1-D A) or block form (grouped conv, attention)
            B = structure(capture).blocks
            G, A = factors.kfac_weight_factors(capture, src, self.kfac_approx)
            out["weight"] = capture.orientation.pair(G, A)
            self.act_index[id(params["weight"])] = capture.orientation.act_index
        if "bias" in params:
            sb = capture.bias_cot(src)
            Bb = structure(capture, "bias").blocks  # block form (attention's in_proj_bias)
            if G is None or sb is not capture.cot(src) or B != Bb:
                G = factors.kfac_cot_factor(sb, self.kfac_approx, Bb)
            out["bias"] = [G]
        if self.cross:
            if structure(capture).kind == "blocks" or structure(capture, "bias").blocks > 1:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support the grouped {capture.module} "
                    "yet; use cross_layer=False."
                )
            self.cross.compute(capture)
        return out
