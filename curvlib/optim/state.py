"""Optimizer state that is not per parameter: step counter, update schedule, generator.

Everything here is stored in ``state_dict()["curvlib"]`` as numbers, strings, lists, dicts and
tensors only, so that ``torch.load(path, weights_only=True)`` restores a checkpoint.
Callable hyper-parameters (``T_cov=lambda step: ...``) cannot be saved safely; ``state_dict()``
writes the string ``"<callable>"`` in their place and ``load_state_dict`` keeps the callable of
the optimizer being loaded into (create it with the same callables).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

CALLABLE = "<callable>"


def new_group_state() -> Dict[str, Any]:
    """Per-group schedule: next steps of curvature / inverse updates, the automatic
    ``T_cov`` interval and the damping the cached inverse was built with."""
    return {
        "next_cov": 0,
        "next_inv": 0,
        "cov_interval": 1,
        "inv_damping": None,  # damping requested for the current inverse
        "inv_damping_used": None,  # damping actually used (after retries)
        "inv_mode": None,
        "inv_curvature": None,
        "cov_updates": 0,
        "inv_updates": 0,
        "last_change": None,  # relative change of the running curvature at its last update
    }


def groups_for_saving(param_groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Copies of the param groups with callables replaced by :data:`CALLABLE`."""
    return [{k: (CALLABLE if callable(v) else v) for k, v in g.items()} for g in param_groups]


def restore_callables(saved: List[Dict[str, Any]], current: List[Dict[str, Any]]) -> None:
    """Put the current optimizer's callables where the checkpoint holds :data:`CALLABLE`."""
    for s, c in zip(saved, current):
        for k, v in s.items():
            if isinstance(v, str) and v == CALLABLE:
                if not callable(c.get(k)):
                    raise ValueError(
                        f"curvlib.optim: the checkpoint's {k!r} was a callable; create the optimizer with "
                        f"the same callable {k}=... before load_state_dict."
                    )
                s[k] = c[k]


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


__all__ = ["CALLABLE", "new_group_state", "groups_for_saving", "restore_callables", "generator_state"]
