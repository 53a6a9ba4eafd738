r"""``inverse_stagger``: rebuilding a param group's inverses a portion per step.

With ``inverse_stagger = n > 1``, the ``T_inv`` update of a group at step ``k`` (a *window* of
``T_inv`` steps begins) splits the group's parameters with a curvature into ``min(n, count)``
portions of about equal cost (:func:`portions`, by the kind's ``inverse_cost``: ``m^3`` per
factor side; the cheapest first) and rebuilds the first at step ``k``, the second at ``k + 1``,
..., each from the running curvature of its step; the other parameters keep the inverses they
have. So the slowest step
pays about ``1 / n`` of the inverses instead of all of them, and every parameter's inverse is
rebuilt once per window (``n <= T_inv``), at most ``n - 1`` steps later than without staggering.
The portions still to rebuild are saved (``GroupState.inv_pending``: indices into the group's
``params``), so a checkpoint in the middle of a window resumes it as it would have run.

Applies to curvatures whose inverse is one independent inverse per parameter
(:attr:`~curvlib.optim.curvatures.CurvatureKind.separable`: the Kronecker curvatures, ``diag``, and
the eigenbases of ``ekfac`` / ``eigen-adam``); during ``curvature_warmup`` every inverse is rebuilt
at every step as without staggering. A parameter without a gradient at its portion's step keeps its
inverse until the next window.
"""
from __future__ import annotations

from typing import List, Sequence


def portions(costs: Sequence[float], n: int) -> List[List[int]]:
    """Split the items ``0 .. len(costs) - 1`` into ``min(n, len(costs))`` non-empty portions of
    about equal total cost: longest processing time first (each item, most costly first, to the
    portion with the least cost so far; ties to the lower index), each portion sorted; the
    portions in increasing order of cost (the first is rebuilt at the window's first step, which
    usually also captures the curvature: ``T_inv`` a multiple of ``T_cov``). Deterministic."""
    n = min(int(n), len(costs))
    if n <= 0:
        return []
    load = [0.0] * n
    out: List[List[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        j = min(range(n), key=lambda j: (load[j], j))
        load[j] += float(costs[i])
        out[j].append(i)
    order = sorted(range(n), key=lambda j: (load[j], j))
    return [sorted(out[j]) for j in order]


__all__ = ["portions"]
