r"""Grafting: the curvature's direction with the norm of a first-order method's step.

Per parameter ``p`` with gradient ``g`` and direction ``d`` (Agarwal et al. 2020, "Disentangling
Adaptive Gradient Methods from Learning Rates"; Distributed Shampoo's grafting, Shi et al. 2023)::

    d  <-  d · ||s|| / ||d||         (d = 0 stays 0)

with the grafted method's step ``s``:

- ``graft="sgd"``: ``s = g``;
- ``graft="adam"``: ``s = g / (sqrt(v̂) + ε)``, ``v <- β2 v + (1-β2) g²``, ``v̂ = v / (1 - β2^t)``
  with ``β2 = adam_betas[1]``, ``ε = adam_eps`` (Distributed Shampoo's ``AdamGraftingConfig``:
  Adam's second moment; the first moment is the optimizer's ``momentum``, applied after, as
  there). State: ``state[p]["graft_exp_avg_sq"]``, ``["graft_step"]``.

A parameter without curvature (no adapter, or a ``curvature=None`` group) takes ``s`` itself, so
that with grafting every parameter steps at the first-order method's scale and a learning rate
tuned for that method transfers. Grafting comes before ``kl_clip``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from curvlib.optim.hyperparams import HyperParameter, Rule, number, one_of

GRAFTS = ("adam", "sgd")

GRAFT = HyperParameter(
    "graft", "str or None", None,
    "per parameter, the direction rescaled to the norm of `\"adam\"`'s step `g / (sqrt(v̂) + adam_eps)` or "
    "`\"sgd\"`'s `g` (parameters without curvature take that step), so that a first-order lr transfers",
    one_of(None, *GRAFTS),
)
ADAM_BETAS = HyperParameter(
    "adam_betas", "tuple of 2 floats", (0.9, 0.999),
    "`(β1, β2)` of `curvature=\"eigen-adam\"`'s moments; `β2` also of `graft=\"adam\"`",
    Rule(lambda v, g: len(v) == 2 and all(0.0 <= float(b) < 1.0 for b in v), "two numbers in [0, 1)"),
)
ADAM_EPS = HyperParameter(
    "adam_eps", "float", 1e-8, "`ε` added to `sqrt(v̂)` by `\"eigen-adam\"` and `graft=\"adam\"`",
    number(0, low_open=True, finite=True),
)

#: the rows of the running-curvature optimizers' tables
GRAFT_HYPERPARAMETERS = (GRAFT, ADAM_BETAS, ADAM_EPS)


def graft_step(
    group: Mapping[str, Any], g: Tensor, state: Mapping[str, Any]
) -> Tuple[Tensor, Dict[str, Any]]:
    """The grafted method's step ``s`` for gradient ``g`` and the state entries to write (out of
    place: ``state`` is not modified)."""
    if group["graft"] == "sgd":
        return g, {}
    b2 = float(group["adam_betas"][1])
    v, t = state.get("graft_exp_avg_sq"), int(state.get("graft_step", 0)) + 1
    v = g.square() * (1.0 - b2) if v is None else v * b2 + g.square() * (1.0 - b2)
    s = g / ((v / (1.0 - b2**t)).sqrt() + float(group["adam_eps"]))
    return s, {"graft_exp_avg_sq": v, "graft_step": t}


def graft(
    group: Mapping[str, Any], grads: List[Tensor], dirs: List[Tensor], curved: List[bool],
    states: List[Mapping[str, Any]],
) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
    """The grafted directions (module docstring) and, per parameter, the state entries to write."""
    out, entries = [], []
    for g, d, c, st in zip(grads, dirs, curved, states):
        s, e = graft_step(group, g, st)
        if c:
            dn = torch.linalg.vector_norm(d)
            s = d * (torch.linalg.vector_norm(s) / dn) if float(dn) > 0 else d
        out.append(s)
        entries.append(e)
    return out, entries


__all__ = ["GRAFT", "GRAFTS", "ADAM_BETAS", "ADAM_EPS", "GRAFT_HYPERPARAMETERS", "graft", "graft_step"]
