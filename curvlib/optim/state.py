r"""What the optimizers keep, and how it is saved.

An optimizer of :mod:`curvlib.optim` keeps three things:

- ``opt.param_groups``: the hyper-parameters (torch's; :mod:`curvlib.optim.hyperparams`);
- ``opt.state[p]``: per parameter (torch's), with the keys

  ``running`` (the running curvature, a tensor or nested list of tensors; checkpoints saved
  before the rename call it ``curvature`` and are migrated on load), ``inverse_of`` (the
  curvature the current inverse was built from), ``batch`` / ``inverse_batch`` (``exact-ng*``: the
  capture step of the per-sample factors in ``running`` / ``inverse_of``; factors of a parameter
  that a later capture did not see are dropped, never solved with another batch's),
  ``inverse_clipped``, ``inverse_damping`` (``inverse_stagger``: the damping the parameter's
  inverse was built with), ``kpsvd_warm``,
  ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``adam_step`` (NaturalGradient) and
  ``cg_iterations``, ``cg_residual``, ``cg_converged``, ``cg_negative_curvature``,
  ``direction`` (CGNewton);
- ``opt.core``: a :class:`CoreState`, everything else: the step counter, the generator, the
  per-group schedule (:class:`GroupState`), the cached inverses, the current capture.

``state_dict()`` stores ``param_groups``, ``state`` and ``state_dict()["curvlib"] =
{"step", "generator", "groups"}`` as numbers, strings, lists, dicts and tensors only, so that
``torch.load(path, weights_only=True)`` restores a checkpoint. Callable hyper-parameters
(``T_cov=lambda step: ...``) cannot be saved safely; ``state_dict()`` writes the string
``"<callable>"`` in their place and ``load_state_dict`` keeps the callable of the optimizer being
loaded into (create it with the same callables).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor

CALLABLE = "<callable>"

#: ``state[p]`` keys renamed since earlier checkpoints: old name -> new name
RENAMED_KEYS = {"curvature": "running"}


@dataclass
class GroupState:
    """The schedule of one param group (saved in ``state_dict()["curvlib"]["groups"]``)."""

    #: step of the next curvature / inverse update
    next_cov: int = 0
    next_inv: int = 0
    #: the current interval of ``T_cov="auto"``
    cov_interval: int = 1
    #: the damping requested for the current inverse, the damping it was built with (after
    #: retries), and its damping mode and curvature
    inv_damping: Optional[float] = None
    inv_damping_used: Optional[float] = None
    inv_mode: Optional[str] = None
    inv_curvature: Optional[str] = None
    #: the curvature kind of the group's running curvature (``None``: none yet, or a checkpoint
    #: written before it was kept); another kind in the group (switched between steps) starts a
    #: new running curvature at the next step
    running_curvature: Optional[str] = None
    cov_updates: int = 0
    inv_updates: int = 0
    #: ``inverse_stagger``: the portions of the current ``T_inv`` window still to rebuild, one per
    #: step (indices into the group's ``params``; :mod:`curvlib.optim.stagger`)
    inv_pending: List[List[int]] = field(default_factory=list)
    #: relative change ``||C' - C|| / ||C||`` of the running curvature at its last update
    last_change: Optional[float] = None
    #: Levenberg–Marquardt's reduction ratio at its last adaptation (NaturalGradient)
    last_rho: Optional[float] = None
    #: the group's CG totals of the last step: iterations, residual, negative curvature (CGNewton)
    last_cg: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GroupState":
        """From a saved dict (checkpoints of every version: unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class CaptureRecord:
    """A completed ``opt.capture()``: its step, extensions and curvature context."""

    step: int
    extensions: List[Any]
    context: Any


@dataclass
class CoreState:
    """Everything an optimizer keeps besides ``param_groups`` and ``state`` (``opt.core``).

    Saved: ``step``, ``generator``, ``groups``. Rebuilt after ``load_state_dict``: ``solves``
    (from ``state[p]["inverse_of"]``). Per process: the rest.
    """

    #: draws MC targets and curvature sub-batches; its state is part of the checkpoint
    generator: torch.Generator
    #: the number of completed steps
    step: int = 0
    #: one schedule per param group
    groups: List[GroupState] = field(default_factory=list)
    #: the last completed capture (used by the step with the same number)
    capture: Optional[CaptureRecord] = None
    #: the generator's state when this step's capture began (restored when the step fails)
    generator_before: Optional[Tensor] = None
    #: cached damped inverse per group index: ``(key, Solve)``
    solves: Dict[int, Tuple[Any, Any]] = field(default_factory=dict)
    #: CGNewton: one dict per CG solve of the last step
    last_cg: List[Dict[str, Any]] = field(default_factory=list)
    #: the data-parallel helper (:mod:`curvlib.optim.distributed`), ``None`` in one process
    distributed: Any = None
    #: a closure is evaluated after the update (Levenberg–Marquardt): ``capture()`` is a no-op
    evaluating: bool = False
    #: what has been announced once (parameters without curvature, ``ema_decay`` not applying)
    warned: Set[str] = field(default_factory=set)

    def saved(self) -> Dict[str, Any]:
        """``state_dict()["curvlib"]``."""
        return {"step": self.step, "generator": self.generator.get_state().clone(),
                "groups": [g.to_dict() for g in self.groups]}

    def __getstate__(self) -> Dict[str, Any]:
        """Copies (``copy.deepcopy``, ``pickle``): the generator as its state; the cached inverses
        and a pending capture are dropped (rebuilt / taken again); a data-parallel optimizer
        cannot be copied (its process group belongs to this process)."""
        if self.distributed is not None:
            raise TypeError(
                "curvlib.optim: a data-parallel optimizer cannot be copied or pickled (its process group belongs "
                "to this process); save opt.state_dict() and load it into a new optimizer instead."
            )
        state = dict(self.__dict__)
        state.update(generator=self.generator.get_state().clone(), solves={}, capture=None, warned=set(self.warned))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        gen = torch.Generator()
        gen.set_state(state["generator"])
        self.__dict__.update(state, generator=gen)

    def load(self, saved: Dict[str, Any]) -> None:
        self.step = int(saved["step"])
        self.generator.set_state(saved["generator"].to(torch.uint8).cpu())
        self.groups = [GroupState.from_dict(g) for g in saved["groups"]]
        self.solves = {}
        self.capture = None


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


def migrate_param_state(state: Dict[Any, Dict[str, Any]]) -> Dict[Any, Dict[str, Any]]:
    """Per-parameter state of an earlier checkpoint with its keys renamed (:data:`RENAMED_KEYS`)."""
    out = {}
    for pid, s in state.items():
        s = dict(s)
        for old, new in RENAMED_KEYS.items():
            if old in s and new not in s:
                s[new] = s.pop(old)
        out[pid] = s
    return out


__all__ = [
    "CALLABLE", "RENAMED_KEYS", "GroupState", "CaptureRecord", "CoreState", "groups_for_saving", "restore_callables",
    "migrate_param_state",
]
