r"""Damping: robust construction of the damped inverse, and Levenberg–Marquardt adaptation.

Inverse construction (:func:`robust_inverse`): the solvers raise on a failed or non-positive
eigendecomposition instead of returning NaN. The optimizer then retries (1) in float64 and
(2) with ten, a hundred and a thousand times the damping, warning each time; if all fail it
raises, naming the group's curvature.

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
from typing import List, Tuple

import torch

from curvlib.optim.curvatures import CurvatureKind, Solve
from curvlib.optim.tensors import tree_leaves, tree_map

RETRY_FACTORS = (10.0, 100.0, 1000.0)


def robust_inverse(
    curv: CurvatureKind, params, curvs, damping: float, damping_mode: str, group, where: str
) -> Tuple[Solve, float]:
    """Build ``curv``'s damped inverse, retrying in float64 and then with larger damping.

    Returns ``(solve, damping_used)``; directions come back in the parameters' dtype.
    """
    try:
        return curv.inverse(params, curvs, damping, damping_mode, group), damping
    except NotImplementedError:  # a structure the solver does not support: no retry helps
        raise
    except (ValueError, RuntimeError) as first:  # LinAlgError is a RuntimeError
        error = first
    attempts: List[Tuple[str, float]] = []
    if any(t.dtype != torch.float64 for c in curvs for t in tree_leaves(c)):
        attempts.append(("in float64", damping))
    attempts += [(f"with damping {damping * f:g} (x{f:g})", damping * f) for f in RETRY_FACTORS]
    curvs64 = [tree_map(lambda t: t.double(), c) for c in curvs]
    for how, lam in attempts:
        warnings.warn(
            f"curvlib.optim: building the {curv.name!r} inverse of {where} failed ({error}); retrying {how}.",
            RuntimeWarning,
            stacklevel=4,
        )
        try:
            solve = curv.inverse(params, curvs64, lam, damping_mode, group)
        except (ValueError, RuntimeError) as e:
            error = e
            continue
        return _cast_back(solve, params), lam
    raise RuntimeError(
        f"curvlib.optim: the {curv.name!r} inverse of {where} could not be built even in float64 with "
        f"{RETRY_FACTORS[-1]:g} x damping ({error}). Increase `damping`, lower the learning rate, or check "
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


__all__ = ["robust_inverse", "levenberg_marquardt", "quadratic_model"]
