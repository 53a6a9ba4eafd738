"""Exact curvature blocks ``p.block_fisher`` and per-sample gradient factors ``p.grad_factors``.

With ``U_p`` the ``[K*N, p.numel()]`` stack of the per-sample gradients ``X_{k,n}`` of the
chosen source (scaled as in :mod:`curvlib.engine.capture`), the curvature block of
``p.flatten()`` is ``F_pp = U_p^T U_p`` (exact for ``"type-2"`` and ``"empirical"``, unbiased
for ``"mc"``), and the whole network's matrix is ``F = U^T U`` with ``U = [U_1, ..., U_P]``.

Block (``ExactBlockFisher``, ``p.block_fisher`` ``[p.numel(), p.numel()]``):

- ``T = 1`` and ``K >= 2`` (type-2 with several classes, mc with several samples): with
  ``X = s a^T``, ``F = sum_n S_n ⊗ (a_n a_n^T)``, ``S_n = sum_k s_kn s_kn^T``: one matmul
  ``[D_s^2, N] @ [N, D_a^2]`` (``N`` instead of ``K N`` rows) and one permutation.
- otherwise: ``U^T U``, one matmul, ``U`` formed with :func:`~curvlib.engine.factors.outer_sum`.

Factors (``GradFactors``, ``p.grad_factors`` ``[K*N, *p.shape]``, row ``k*N + n``) for the
exact natural gradient by Woodbury (Ren & Goldfarb 2019): :func:`stack_grad_factors` stacks
them over the network (``F = U^T U``); ``for_woodbury=True`` multiplies by ``sqrt(m)``,
``m = K*N``, which is the convention ``F = U^T U / m`` of
:func:`curvlib.solvers.woodbury_solve` and :func:`curvlib.solvers.woodbury_solve_blocks`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine.capture import LayerCapture
from curvlib.extensions.base import Extension
from curvlib.engine.factors import Orientation, outer_sum
from curvlib.extensions.batch_grad import reusable_buffer


def _weight_block(s: Tensor, a: Tensor, orient: Orientation) -> Tensor:
    """``sum_{k,n} vec(X_kn) vec(X_kn)^T`` for ``X_kn = sum_t s_knt a_nt^T`` (or its transpose)."""
    K, N, T, Ds = s.shape
    Da = a.shape[-1]
    if T == 1 and K >= 2:
        s1, a1 = s[:, :, 0], a[:, 0]
        S = torch.einsum("kni,knj->nij", s1, s1).reshape(N, Ds * Ds)
        A = torch.einsum("ni,nj->nij", a1, a1).reshape(N, Da * Da)
        B = (S.T @ A).view(Ds, Ds, Da, Da)
        return orient.block_of_grams(B)
    U = outer_sum(s, a, orient, s.new_empty(K * N, Ds * Da))
    return U.T @ U


class ExactBlockFisher(Extension):
    """``p.block_fisher``: the dense curvature block ``[p.numel(), p.numel()]`` of
    ``p.flatten()`` for the chosen ``fisher_type`` (memory ``p.numel()^2``: small layers).

    Exact for ``"type-2"`` (the GGN block, cross-position terms of weight sharing included) and
    ``"empirical"``; for ``"mc"`` the unbiased estimate of the drawn targets.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN), ``"mc"`` or ``"empirical"``.
        mc_samples: sampled targets per datum, for ``"mc"`` only.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import ExactBlockFisher
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(ExactBlockFisher(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> model[0].weight.block_fisher.shape   # weight [3, 4]: 12 entries
        torch.Size([12, 12])
        >>> model[0].bias.block_fisher.shape
        torch.Size([3, 3])
    """

    savefield = "block_fisher"
    accumulation = "sum"

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        out, src = {}, self.source
        for name in capture.params:
            form = capture.structure(name)
            if form.summed:
                b = capture.sum_cot(name, src).sum(2)
                b = b.reshape(-1, b.shape[-1])
                out[name] = b.T @ b
            elif not form.factored:  # grouped layout, tied parameter: from per-sample gradients
                U = capture.per_sample_grads(name, src).flatten(2).flatten(0, 1)
                out[name] = U.T @ U
            else:
                out[name] = _weight_block(capture.cot(src), capture.act(), capture.orientation)
        return out


class GradFactors(Extension):
    """``p.grad_factors``: per-sample (per-class for type-2, per-draw for mc) gradients
    ``[K*N, *p.shape]`` of the chosen source, row ``k*N + n``, scaled so that
    ``U^T U`` is the curvature (``U`` the rows flattened). See :func:`stack_grad_factors`.

    ``K`` per datum: ``"type-2"``: the columns of the loss-Hessian square root -- ``C - 1`` for
    ``CrossEntropyLoss`` on ``[N, C]`` logits (Householder square root of ``diag(p) - p p^T``,
    which has rank ``C - 1``), ``C`` for ``NLLLoss``, the number of outputs ``D`` for ``MSELoss``
    / ``BCEWithLogitsLoss``; with output positions (``[N, C, d1, ...]``) one column per class (or
    output) and position, ``C d1 ...``. ``"mc"``: ``mc_samples``; ``"empirical"``: 1.
    ``stack_grad_factors(params, for_woodbury=True)`` is ``[m, d]`` with ``m = K N`` and
    ``F = U^T U / m``, the convention of :func:`curvlib.solvers.woodbury_solve`.

    Scaling: the curvature of the loss as the user reduced it (``reduction="mean"`` over ``N``
    samples: ``1/N`` times the sum over samples; ``"sum"``: the sum), for ``"mc"`` averaged over
    the ``mc_samples`` draws.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact: ``K`` as above), ``"mc"``
            (``K = mc_samples``) or ``"empirical"`` (``K = 1``).
        mc_samples: sampled targets per datum for ``"mc"``.
        reuse_buffers: overwrite the previous ``p.grad_factors`` in place when nothing else
            refers to it (see :func:`~curvlib.extensions.batch_grad.reusable_buffer`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import GradFactors, stack_grad_factors
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> from curvlib.solvers import woodbury_solve
        >>> with curvature(GradFactors(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> model[0].weight.grad_factors.shape   # K = 2 - 1 classes, N = 8: [K*N, 3, 4]
        torch.Size([8, 3, 4])
        >>> params = list(model.parameters())
        >>> U = stack_grad_factors(params, for_woodbury=True)  # [m, d], F = U^T U / m
        >>> U.shape
        torch.Size([8, 23])
        >>> g = torch.cat([p.grad.flatten() for p in params])
        >>> woodbury_solve(U, g, damping=1e-3).shape  # (F + 1e-3 I)^-1 g
        torch.Size([23])
    """

    savefield = "grad_factors"
    #: the engine skips its NaN/Inf scan of the (large) result; compute() checks the inputs
    check_finite = False
    accumulation = "custom"

    def accumulate(self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]) -> Any:
        """Rows of all micro-batches, keeping the layout ``k * N + n`` over the total ``N``."""
        n0, n1 = counts
        K = old.shape[0] // n0
        if new.shape[0] != K * n1:
            raise ValueError(
                f"curvlib: GradFactors of the {name} of {capture.module}: the backwards of this "
                f"context have different numbers of columns per sample ({K} and "
                f"{new.shape[0] // n1}); accumulate micro-batches of one fisher_type and shape."
            )
        rows = torch.cat([old.reshape(K, n0, -1), new.reshape(K, n1, -1)], dim=1)
        return rows.reshape(K * (n0 + n1), *old.shape[1:])

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1, reuse_buffers: bool = True):
        super().__init__(fisher_type, mc_samples)
        self.reuse_buffers = bool(reuse_buffers)

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        out, src = {}, self.source
        for name, p in capture.params.items():
            K, N = capture.finite_inputs(name, src)
            shape = (K * N, *p.shape)
            buf = reusable_buffer(p, self.savefield, shape, p) if self.reuse_buffers else None
            out[name] = capture.per_sample_grads_into(name, src, buf)
        return out


def grad_factor_blocks(
    params: Iterable[nn.Parameter], for_woodbury: bool = False, savefield: str = "grad_factors"
) -> List[Tensor]:
    """Per-parameter factors ``U_p`` ``[m, p.numel()]`` (views), ``F_pp = U_p^T U_p``.

    ``for_woodbury=True``: ``sqrt(m) U_p`` (a copy), so that ``F_pp = U^T U / m`` as
    :func:`curvlib.solvers.woodbury_solve_blocks` expects.
    """
    blocks = []
    for i, p in enumerate(params):
        U = getattr(p, savefield, None)
        if not isinstance(U, Tensor):
            raise RuntimeError(
                f"curvlib: parameter {i} (shape {tuple(p.shape)}) has no .{savefield}; run the "
                "backward inside `with curvature(GradFactors(...))` on an extended model and "
                "pass only parameters of extended layers (Linear, Conv, ConvTranspose)."
            )
        blocks.append(U.reshape(U.shape[0], -1))
    m = {U.shape[0] for U in blocks}
    if len(m) > 1:
        raise ValueError(
            f"curvlib: the .{savefield} of the parameters have different row counts {sorted(m)}; "
            "they must come from the same backward (same batch and fisher_type)."
        )
    if for_woodbury and blocks:
        r = math.sqrt(blocks[0].shape[0])
        blocks = [U * r for U in blocks]
    return blocks


def stack_grad_factors(
    params: Iterable[nn.Parameter], for_woodbury: bool = False, savefield: str = "grad_factors"
) -> Tensor:
    """The whole-network factor ``U`` ``[m, sum_p p.numel()]`` in ``params`` order:
    ``F = U^T U`` (``for_woodbury=True``: ``F = U^T U / m``, :func:`curvlib.solvers.woodbury_solve`'s
    convention, so ``woodbury_solve(U, g, λ) = (F + λ I)^-1 g``).

    ``m = K N`` rows, ``K`` factors per sample (see :class:`GradFactors`): for ``"type-2"``
    ``K = C - 1`` with ``CrossEntropyLoss`` on ``[N, C]`` logits, ``C`` with ``NLLLoss``, the
    number of outputs with ``MSELoss`` / ``BCEWithLogitsLoss``, ``C d1 ...`` for outputs with
    positions ``[N, C, d1, ...]``; ``mc_samples`` for ``"mc"``; ``1`` for ``"empirical"``. The
    parameters must come from one backward inside ``curvature(GradFactors(...))``."""
    return torch.cat(grad_factor_blocks(params, for_woodbury, savefield), dim=1)


__all__ = ["ExactBlockFisher", "GradFactors", "grad_factor_blocks", "stack_grad_factors"]
