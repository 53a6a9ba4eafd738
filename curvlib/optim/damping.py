r"""Damping: robust construction of the damped inverse, and Levenberg–Marquardt adaptation.

Inverse construction (:func:`robust_inverse`): the solvers raise on a failed or non-positive
eigendecomposition instead of returning NaN. The optimizer then retries (1) in float64 and
(2) with ten, a hundred and a thousand times the damping (from :data:`DAMPING_FLOOR` when the
damping is 0, where multiples would change nothing), warning each time; if all fail it raises,
naming the group's curvature. Running out of memory is not a numerical failure: it is re-raised
at once as ``torch.OutOfMemoryError`` naming the group's parameters and their largest factor (a
float64 retry would need twice the memory).

Levenberg–Marquardt (Martens & Grosse 2015, §6.5): every ``damping_interval`` steps, with the
loss ``h`` before and after the update ``Δ`` (from ``step(closure)``) and the quadratic model

    M(Δ) = g^T Δ + 1/2 Δ^T (C + λ I) Δ

(``C`` the running approximate curvature, ``g`` the gradient that was preconditioned), the
reduction ratio is ``ρ = (h(θ + Δ) - h(θ)) / M(Δ)``; ``λ <- ω λ`` if ``ρ > 3/4``, ``λ <- λ / ω``
if ``ρ < 1/4`` (``ω = damping_decay``, Martens & Grosse use ``(19/20)^5`` with an interval of 5),
clamped to ``[min_damping, max_damping]``.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch

from curvlib.optim.curvatures import CurvatureKind, Solve
from curvlib.optim.tensors import tree_leaves, tree_map

RETRY_FACTORS = (10.0, 100.0, 1000.0)
#: the damping the retries multiply when the group's damping is 0 (``min_damping``'s default)
DAMPING_FLOOR = 1e-8
#: how torch's CPU / CUDA allocators word an allocation failure
_OOM_TEXT = ("out of memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    """``torch.OutOfMemoryError``, or a ``RuntimeError`` of an allocator that ran out of memory."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT))


def _largest_factor(params, curvs, names) -> str:
    """The largest tensor of the curvature values, with its parameter (for the OOM message)."""
    best = None
    for i, c in enumerate(curvs):
        for t in tree_leaves(c):
            if best is None or t.numel() > best[0].numel():
                best = (t, i)
    if best is None:
        return "no factors"
    t, i = best
    who = names[i] if names is not None else f"the parameter of shape {tuple(params[i].shape)}"
    size = t.numel() * t.element_size()
    return (f"the largest factor is {' x '.join(map(str, t.shape))} ({t.dtype}, {size / 2**20:.1f} MiB) of {who}")


def _raise_out_of_memory(curv: CurvatureKind, params, curvs, where: str, names, error: BaseException) -> None:
    raise torch.OutOfMemoryError(
        f"curvlib.optim: out of memory while building the {curv.name!r} inverse of {where} "
        f"({len(params)} parameters; {_largest_factor(params, curvs, names)}): {error}. Not retried (a float64 "
        "retry needs twice the memory). Put the largest layers in a group with curvature='diag' or "
        "kfac_approx='reduce', lower the batch of the curvature (curvature_batch_fraction), or free memory."
    ) from error


def robust_inverse(
    curv: CurvatureKind, params, curvs, damping: float, damping_mode: str, group, where: str,
    names: Optional[List[str]] = None,
) -> Tuple[Solve, float]:
    """Build ``curv``'s damped inverse, retrying in float64 and then with larger damping
    (module docstring; ``names``: the parameters' names for the out-of-memory message).

    Returns ``(solve, damping_used)``; directions come back in the parameters' dtype.
    """
    try:
        return curv.inverse(params, curvs, damping, damping_mode, group), damping
    except NotImplementedError:  # a structure the solver does not support: no retry helps
        raise
    except (ValueError, RuntimeError) as first:  # LinAlgError is a RuntimeError
        if is_out_of_memory(first):
            _raise_out_of_memory(curv, params, curvs, where, names, first)
        error = first
    attempts: List[Tuple[str, float]] = []
    if any(t.dtype != torch.float64 for c in curvs for t in tree_leaves(c)):
        attempts.append(("in float64", damping))
    base = damping if damping > 0 else DAMPING_FLOOR
    attempts += [(f"with damping {base * f:g} ({'x' if damping > 0 else 'floor ' + format(base, 'g') + ' x'}{f:g})",
                  base * f) for f in RETRY_FACTORS]
    try:
        curvs64 = [tree_map(lambda t: t.double(), c) for c in curvs]
    except RuntimeError as e:
        if is_out_of_memory(e):
            _raise_out_of_memory(curv, params, curvs, where, names, e)
        raise
    for how, lam in attempts:
        warnings.warn(
            f"curvlib.optim: building the {curv.name!r} inverse of {where} failed ({error}); retrying {how}.",
            RuntimeWarning,
            stacklevel=4,
        )
        try:
            solve = curv.inverse(params, curvs64, lam, damping_mode, group)
        except (ValueError, RuntimeError) as e:
            if is_out_of_memory(e):
                _raise_out_of_memory(curv, params, curvs64, where, names, e)
            error = e
            continue
        return _cast_back(solve, params), lam
    raise RuntimeError(
        f"curvlib.optim: the {curv.name!r} inverse of {where} could not be built even in float64 with "
        f"{RETRY_FACTORS[-1]:g} x damping{'' if damping > 0 else f' (from {DAMPING_FLOOR:g})'} ({error}). Increase `damping`, lower the learning rate, or check "
        "the model for exploding activations."
    )


def _cast_back(solve: Solve, params) -> Solve:
    def fn(grads, extras):
        out = solve([g.double() for g in grads], extras)
        return [d.to(g.dtype) for d, g in zip(out, grads)]

    return Solve(fn, solve.parts)  # the float64 parts: directions are cast by the optimizer


def levenberg_marquardt(
    damping: float, rho: float, decay: float, min_damping: float, max_damping: float
) -> float:
    """The new damping for reduction ratio ``rho`` (module docstring)."""
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / decay
    elif rho > 0.75:
        damping = damping * decay
    return float(min(max(damping, min_damping), max_damping))


def quadratic_model(
    grads: List[torch.Tensor], deltas: List[torch.Tensor], curv_deltas: List[torch.Tensor], damping: float
) -> float:
    """``M(Δ) = g^T Δ + 1/2 Δ^T C Δ + λ/2 |Δ|^2`` (``curv_deltas = C Δ``)."""
    total = 0.0
    for g, d, cd in zip(grads, deltas, curv_deltas):
        total += float((g * d).sum()) + 0.5 * float((d * cd).sum()) + 0.5 * damping * float((d * d).sum())
    return total


def lm_groups(param_groups, k: int) -> List[int]:
    """The param groups that adapt their damping at step ``k`` (``adaptive_damping``, every
    ``damping_interval`` steps)."""
    return [gi for gi, g in enumerate(param_groups) if g.get("adaptive_damping") and k % g["damping_interval"] == 0]


def adapt_groups(opt, plan, h0: float, h1: float, curv_deltas) -> None:
    """Levenberg–Marquardt on every group of :func:`lm_groups` after a committed step (module
    docstring): ``curv_deltas(gi, params, deltas) -> C Δ`` per parameter (zeros where there is
    no curvature); writes the group's new ``damping`` and ``opt.core.groups[gi].last_rho``."""
    for gi in lm_groups(opt.param_groups, plan.step):
        group, gp = opt.param_groups[gi], plan.groups[gi]
        deltas = [plan.deltas[id(p)] for p in gp.params]
        model = quadratic_model(gp.grads, deltas, curv_deltas(gi, gp.params, deltas), float(group["damping"]))
        rho = (h1 - h0) / model if model < 0 and math.isfinite(h1) else -math.inf
        group["damping"] = levenberg_marquardt(
            float(group["damping"]), rho, float(group["damping_decay"]),
            float(group["min_damping"]), float(group["max_damping"]),
        )
        opt.core.groups[gi].last_rho = rho


__all__ = [
    "robust_inverse", "is_out_of_memory", "DAMPING_FLOOR", "RETRY_FACTORS", "levenberg_marquardt",
    "quadratic_model", "lm_groups", "adapt_groups",
]
