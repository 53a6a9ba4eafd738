"""Diagonal of the curvature blocks: ``p.diag_ggn`` ``[*p.shape]``.

``diag(F_p) = sum_{k,n} X_{k,n} ⊙ X_{k,n}`` over the per-sample gradients ``X_{k,n}`` of the
source (see :mod:`curvlib.engine.capture`), without materialising them where possible:

- ``T = 1`` (Linear): ``X = s a^T`` so ``diag = sum_n (sum_k s_n^2) (a_n^2)^T`` — one matmul
  ``[D_s, N] @ [N, D_a]``.
- ``T > 1`` (weight sharing, convolutions): ``diag_ij = sum_{k,n} (sum_t s_{knti} a_{ntj})^2``
  has cross terms ``t != t'``. Two exact routes, the cheaper one is taken per layer:
  *per-sample*: form ``X_{k,n}`` (one batched matmul, ``K N T D_s D_a`` flops, ``K N D_s D_a``
  memory) and sum its squares; *factored*: ``diag = sum_{n,t,t'} (sum_k s_{knt} ⊙ s_{knt'})
  (a_{nt} ⊙ a_{nt'})^T`` — one matmul with contraction ``N T^2`` (``N T^2 D_s D_a`` flops),
  cheaper when ``T < K`` (e.g. short sequences with many classes).
- bias: ``sum_{k,n} (sum_t s'_{knt})^2``.
- grouped convolutions and tied parameters (one parameter used by several layers,
  :mod:`curvlib.engine.tying`): from the per-sample gradients ``X_{k,n}`` (for a tied parameter
  the sum of its uses' in the parameter's shape, so the cross terms between the uses are in).

With ``fisher_type="type-2"`` this is BackPACK's ``DiagGGNExact`` (the exact per-position
loss-Hessian square root is used); ``"mc"`` is BackPACK's ``DiagGGNMC`` for the same samples.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import Orientation, outer_sum
from curvlib.extensions.base import Extension


def _diag_weight(s: Tensor, a: Tensor, orient: Orientation, s2: Optional[Tensor] = None) -> Tensor:
    """``sum_{k,n} X_{k,n}^2`` in the weight's orientation (``[D_s, D_a]`` or ``[D_a, D_s]``).

    ``s2``: ``sum_k s^2`` ``[N, D_s]`` if already computed (``T = 1`` only)."""
    K, N, T, Ds = s.shape
    Da = a.shape[-1]
    if T == 1:
        if s2 is None:
            s2 = _sum_k_squares(s)
        D = s2.T @ a[:, 0].square()
    elif T < K:
        ss = torch.einsum("knti,knui->ntui", s, s).reshape(-1, Ds)
        aa = torch.einsum("nti,nui->ntui", a, a).reshape(-1, Da)
        D = ss.T @ aa
    else:  # the per-sample gradients [K N, D_s, D_a] (outer_sum picks the cheaper kernel)
        X = outer_sum(s, a, "right", s.new_empty(K * N, Ds * Da))
        D = X.square_().sum(0).view(Ds, Da)
    return orient.from_cot_act(D)


def _sum_k_squares(s: Tensor) -> Tensor:
    """``sum_k s_{k,n,0}^2`` ``[N, D_s]`` for ``s`` ``[K, N, 1, D_s]``."""
    return s[:, :, 0].square().sum(0)


class DiagGGN(Extension):
    """``p.diag_ggn``: the diagonal of the curvature block of ``p`` (shape of ``p``).

    ``p.diag_ggn`` has ``p.shape`` (``[out, in, *kernel]`` for a weight, ``[out]`` for a bias):
    entry ``i`` is ``C[i, i]`` of the curvature block ``C`` of ``p.flatten()``, reshaped.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.
    Type-2 equals BackPACK's ``DiagGGNExact``.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN diagonal, BackPACK ``DiagGGNExact``), ``"mc"``
            (``mc_samples`` sampled targets) or ``"empirical"`` (sum of squared scaled gradients).
        mc_samples: sampled targets per datum, for ``"mc"`` only.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import DiagGGN
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(DiagGGN(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> model[0].weight.diag_ggn.shape, model[0].bias.diag_ggn.shape
        (torch.Size([3, 4]), torch.Size([3]))
    """

    savefield = "diag_ggn"
    accumulation = "sum"

    def __init__(self, fisher_type: str = "type-2", mc_samples: int = 1):
        super().__init__(fisher_type, mc_samples)

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        params, src, out = capture.params, self.source, {}
        s2 = None
        if "weight" in params and capture.summed("weight"):
            out["weight"] = capture.sum_cot("weight", src).sum(2).square().sum((0, 1)).reshape(params["weight"].shape)
        elif "weight" in params and not capture.structure().factored:  # grouped conv, tied weight
            out["weight"] = capture.per_sample_grads("weight", src).square().sum((0, 1))
        elif "weight" in params:
            s = capture.cot(src)
            if s.shape[2] == 1:
                s2 = _sum_k_squares(s)
            D = _diag_weight(s, capture.act(), capture.orientation, s2)
            out["weight"] = D.reshape(params["weight"].shape)
        if "bias" in params and not capture.summed("bias"):  # a bias tied to a layer's weight
            out["bias"] = capture.per_sample_grads("bias", src).square().sum((0, 1))
        elif "bias" in params:
            sb = capture.bias_cot(src)
            if s2 is not None and sb is capture.cot(src):  # T = 1, shared cotangents
                out["bias"] = s2.sum(0)
            else:
                out["bias"] = sb.sum(2).square().sum((0, 1))
            out["bias"] = out["bias"].reshape(params["bias"].shape)
        return out


__all__ = ["DiagGGN"]
