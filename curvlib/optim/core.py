r"""The core of every curvlib optimizer: param groups, generator, capture, the step template, checkpoints.

:class:`CurvatureOptimizer` is the base of :class:`~curvlib.optim.NaturalGradient`,
:class:`~curvlib.optim.Preconditioner`, :class:`~curvlib.optim.NoisyNaturalGradient` (through
:class:`~curvlib.optim.running.RunningCurvatureOptimizer`) and :class:`~curvlib.optim.CGNewton`.

**A step is a transaction.** It begins when ``opt.capture()`` is entered (the generator's state is
saved: MC targets and curvature sub-batches are drawn from it) and ends with ``opt.step()``::

    step(closure):   loss = _evaluate(closure)      the closure, if any
                     plan = _plan(loss)             compute everything; change nothing
                     _check(plan)                   every direction / new value is finite
                     _commit(plan)                  in-place updates that cannot raise
                     _after_commit(plan, closure)   (Levenberg–Marquardt: adapt the damping)

Anything that raises before the commit restores the generator and leaves parameters, gradients
and optimizer state as they were before the capture; the caller can skip the batch. Inputs are
checked where they are first used in the plan (gradients, captured curvature: a
``FloatingPointError`` naming the parameter), outputs in :meth:`CurvatureOptimizer._check`.

A subclass says how one group's directions are planned (:meth:`_plan_group`) and applied
(:meth:`_apply`); everything that depends on the curvature is a
:class:`~curvlib.optim.curvatures.CurvatureKind` of ``kinds``, and every hyper-parameter a row of
``hyperparameters`` (:mod:`curvlib.optim.hyperparams`). What an optimizer keeps is described in
:mod:`curvlib.optim.state` (``opt.core``: a :class:`~curvlib.optim.state.CoreState`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlib.engine import curvature
from curvlib.engine.factors import MAX_FACTOR_DIM
from curvlib.extensions import SubBatch
from curvlib.extensions.sub_batch import SubBatchSampler
from curvlib.optim import checkpoint, distributed
from curvlib.optim.curvatures import CURVATURES, CurvatureKind, kind_for, unwrap
from curvlib.optim.hyperparams import REQUIRED, HyperParameter, Table, number, validate_group
from curvlib.optim.state import (
    CaptureRecord, CoreState, GroupState, groups_for_saving, migrate_param_state, restore_callables,
)
from curvlib.optim.tensors import first_nonfinite

#: where the frames of warnings are not attributed (this package and torch)
_INTERNAL = (os.path.dirname(__file__), os.path.dirname(torch.__file__))

#: the constructor arguments every optimizer shares (documentation rows)
SEED = HyperParameter(
    "seed", "int or None", None,
    "seed of the optimizer's `torch.Generator` (MC targets, curvature sub-batches; saved in the state); "
    "`None`: drawn from the global RNG",
)
PROCESS_GROUP = HyperParameter(
    "process_group", "str, ProcessGroup or None", "auto",
    "data-parallel: `\"auto\"` (the default group when `torch.distributed` is initialized), a group, or `None` "
    "(one process); see `curvlib.optim.distributed`",
)
CHECK_SYNC = HyperParameter(
    "check_sync", "bool", False,
    "data-parallel: compare a parameter checksum and the hyper-parameters (damping, lr, ...) across ranks at every step",
)
#: ``lr >= 0``: schedulers reach 0 (warm-up from 0, cosine annealing to ``eta_min=0``)
LR = HyperParameter("lr", "float", REQUIRED, "learning rate", number(0, finite=True))


@dataclass
class GroupPlan:
    """One param group's part of a step: its parameters with a gradient, their gradients (as
    preconditioned: ``+ wd p`` for L2 weight decay), names, directions and (optional) new values."""

    index: int
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    dirs: List[Tensor] = field(default_factory=list)
    #: the parameters' new values (CGNewton), checked before they are written
    values: Optional[List[Tensor]] = None


@dataclass
class StepPlan:
    """Everything a step writes, computed before anything is written."""

    step: int
    loss: Any
    #: the new schedule of every group (copies of ``opt.core.groups``)
    schedule: List[GroupState]
    groups: List[GroupPlan] = field(default_factory=list)
    #: entries to write into ``opt.state[p]``
    state: Dict[Tensor, Dict[str, Any]] = field(default_factory=dict)
    #: keys to remove from ``opt.state[p]`` (stale per-sample curvature)
    drop: Dict[Tensor, Tuple[str, ...]] = field(default_factory=dict)
    #: new cached inverses by group index
    solves: Dict[int, Tuple[Any, Any]] = field(default_factory=dict)
    #: one dict per CG solve (CGNewton)
    log: List[Dict[str, Any]] = field(default_factory=list)
    #: filled by the commit: applied updates by parameter id (Levenberg–Marquardt)
    deltas: Dict[int, Tensor] = field(default_factory=dict)
    #: the curvature times each direction, ``C d``, by parameter id (CGNewton's Levenberg–Marquardt)
    curv_dirs: Dict[int, Tensor] = field(default_factory=dict)


class CaptureTransaction:
    """The context ``opt.capture()`` returns on steps that need curvature: ``curvlib.curvature``
    with the extensions due, as the first part of the step's transaction. On entry it saves the
    generator's state, clears stale savefields and lets each group's curvature kind prepare the
    extensions (KPSVD warm starts); an error inside restores the generator; a clean exit records
    the capture for the step with the same number."""

    def __init__(self, opt: "CurvatureOptimizer", extensions: List[Any]):
        self.opt, self.extensions, self.step = opt, extensions, opt.core.step
        dp = opt.core.distributed
        # data-parallel: MC targets from a generator seeded per rank (from the shared generator)
        self.gen = opt.core.generator if dp is None else torch.Generator()
        # data-parallel: non-finite captures are stored, and step() fails on every rank at once
        self.ctx = curvature(*extensions, generator=self.gen, check_finite=dp is None)

    def __enter__(self):
        opt, core = self.opt, self.opt.core
        core.generator_before = core.generator.get_state().clone()
        if core.distributed is not None:
            core.distributed.seed(self.gen, core.generator)
        for group in opt.param_groups:
            kind = opt._kind(group)
            for p in group["params"]:
                for ext in self.extensions:  # stale values of an earlier step must not be read
                    p.__dict__.pop(ext.savefield, None)
                if kind is not None:
                    kind.before_capture(p, opt.state.get(p, {}), self.extensions)
        self.ctx.__enter__()
        return self.ctx

    def __exit__(self, exc_type, exc, tb):
        try:
            self.ctx.__exit__(exc_type, exc, tb)
        except BaseException:
            self.opt._rollback()
            raise
        if exc_type is not None:
            self.opt._rollback()
            return False
        self.opt.core.capture = CaptureRecord(self.step, self.extensions, self.ctx)
        return False


class CurvatureOptimizer(Optimizer):
    """Base class of the curvlib optimizers (module docstring).

    Subclasses set ``hyperparameters`` (the table of a param group), ``arguments`` (constructor
    arguments, documentation only) and ``kinds`` (their curvatures), and implement
    :meth:`_plan_group` and :meth:`_apply`.
    """

    hyperparameters: ClassVar[Table] = ()
    arguments: ClassVar[Table] = (SEED, PROCESS_GROUP, CHECK_SYNC)
    kinds: ClassVar[Mapping[str, CurvatureKind]] = CURVATURES
    #: what the check calls a direction in its error message
    direction_name: ClassVar[str] = "preconditioned direction"

    def __init__(
        self, params, defaults: Dict[str, Any], seed: Optional[int] = None, process_group: Any = distributed.AUTO,
        check_sync: bool = False,
    ):
        #: everything beyond ``param_groups`` and ``state`` (:class:`~curvlib.optim.state.CoreState`)
        self.core = CoreState(generator=torch.Generator())
        super().__init__(params, defaults)
        self.core.distributed = distributed.data_parallel(process_group, check_sync)
        if self.core.distributed is not None:
            for gi, g in enumerate(self.param_groups):
                distributed.check_group(self, g, gi)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.core.generator.manual_seed(int(seed))

    @property
    def _where(self) -> str:
        return f"curvlib.optim.{type(self).__name__}"

    @property
    def distributed(self):
        """The :class:`~curvlib.optim.distributed.DataParallel` helper (rank, world size, the
        communication ``stats`` and the ``last`` step's bytes), or ``None`` in one process."""
        return self.core.distributed

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the table's and the curvature's checks (and the
        data-parallel one); a refused group is not added (``param_groups`` is unchanged)."""
        n = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self.check_group(self.param_groups[n], n)
            if self.core.distributed is not None:
                distributed.check_group(self, self.param_groups[n], n)
        except BaseException:
            del self.param_groups[n:]
            raise
        self.core.groups.append(GroupState())

    def check_groups(self) -> None:
        """:meth:`check_group` for every group (before each step: users and schedulers change
        groups between steps), so that a bad value in any group refuses the step before a
        parameter moves."""
        for gi, group in enumerate(self.param_groups):
            self.check_group(group, gi)
            if self.core.distributed is not None:
                distributed.check_group(self, group, gi)

    def check_group(self, group: Mapping[str, Any], gi: int) -> None:
        """Validate one param group against the table and its curvature kind (``ValueError``
        naming the group and the value); changes nothing but one-time warnings."""
        where = f"{self._where}: param group {gi}"
        validate_group(self.hyperparameters, group, where)
        kind = self._kind(group)
        if kind is not None:
            kind.validate(group, where)

    def _kind(self, group: Mapping[str, Any]) -> Optional[CurvatureKind]:
        return kind_for(group["curvature"], self.kinds)

    def _name(self, gi: int, i: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        if names is not None:
            return repr(names[i])
        return f"parameter {i} of param group {gi} (shape {tuple(p.shape)})"

    def _warn_once(self, key: Any, message: str) -> None:
        """A ``UserWarning`` the first time ``key`` is met, attributed to the caller's line
        (the first frame outside :mod:`curvlib.optim` and ``torch``)."""
        if key in self.core.warned:
            return
        self.core.warned.add(key)
        level, frame = 1, sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
            level, frame = level + 1, frame.f_back
        warnings.warn(message, UserWarning, stacklevel=level + 1)

    def _warn_plain(self, name: str, kind: str, p: Optional[Tensor] = None) -> None:
        """Announce once that ``name`` takes the plain step; a zero gradient (``zero_grad(set_to_none=False)``
        keeps one for a layer the backward did not reach) is told apart from a layer without an adapter."""
        if p is not None and p.grad is not None and not bool(p.grad.any()):
            why = ("its gradient is zero and no curvature was captured for it: its layer took no part in this "
                   "backward (an unused branch; zero_grad(set_to_none=False) keeps a zero gradient for it)")
        else:
            why = "its layer has no curvlib adapter or was not extended"
        self._warn_once(("plain", name), (
            f"curvlib.optim: {name} gets no {kind!r} curvature ({why}); it takes the plain (momentum-SGD) step."
        ))

    # ------------------------------------------------------------------ capture
    def _due(self, gi: int, k: int) -> bool:
        """Whether group ``gi`` updates its curvature at step ``k`` (and so needs a capture)."""
        return self._kind(self.param_groups[gi]) is not None and k >= self.core.groups[gi].next_cov

    def _extensions_due(self, k: int) -> List[Any]:
        """The extensions of the groups due for a curvature update, one per distinct
        configuration, each restricted to the parameters of the groups that use it (``restrict``:
        the parameters of the other groups, e.g. a ``curvature=None`` vocabulary head, get no
        factors built), with each group's ``max_factor_dim`` (``limit_factor_dim``)."""
        exts: Dict[Any, Any] = {}
        by_field: Dict[str, Any] = {}
        samplers: Dict[float, SubBatchSampler] = {}
        owned: Dict[Any, List[Tensor]] = {}
        for gi, g in enumerate(self.param_groups):
            if not self._due(gi, k):
                continue
            frac = float(g.get("curvature_batch_fraction", 1.0))
            for ext in self._kind(g).extensions(g):
                key = (type(ext), repr(ext), getattr(ext, "kfac_approx", None), getattr(ext, "cross", None) is not None, frac)
                if frac < 1.0:
                    sampler = samplers.setdefault(frac, SubBatchSampler(frac, self.core.generator))
                    ext = SubBatch(ext, frac, sampler=sampler)
                owned.setdefault(key, []).extend(g["params"])
                target = unwrap(exts.get(key, ext))
                if hasattr(target, "limit_factor_dim"):
                    target.limit_factor_dim(g["params"], g.get("max_factor_dim", MAX_FACTOR_DIM))
                if key in exts:
                    continue
                other = by_field.get(ext.savefield)
                if other is not None:
                    raise ValueError(
                        f"{self._where}: two param groups need {other!r} and {ext!r}, which write the same "
                        f"attribute p.{ext.savefield}; give groups with the same curvature the same fisher_type, "
                        "mc_samples, kfac_approx, rank and pch_convention."
                    )
                exts[key] = by_field[ext.savefield] = ext
        for key, ext in exts.items():
            unwrap(ext).restrict(owned[key])
        return list(exts.values())

    def capture(self):
        """The context to run ``loss.backward()`` in: a ``curvlib.curvature`` with the extensions
        the groups due for a curvature update need (drawing MC targets from the optimizer's
        generator), or a no-op context on steps without a curvature update (and inside a
        closure that the optimizer evaluates after the update, as Levenberg–Marquardt does)."""
        if self.core.evaluating:  # a closure evaluated after the update (its capture would draw MC targets)
            return contextlib.nullcontext()
        self.check_groups()  # the extensions are built from the groups' values
        exts = self._extensions_due(self.core.step)
        if not exts:
            return contextlib.nullcontext()
        return CaptureTransaction(self, exts)

    def _captured(self) -> Optional[CaptureRecord]:
        """The capture of the current step (``None``: there was none)."""
        rec = self.core.capture
        return rec if rec is not None and rec.step == self.core.step else None

    def _require_capture(self, gi: int) -> CaptureRecord:
        rec = self._captured()
        if rec is None:
            raise RuntimeError(
                f"{self._where}: step {self.core.step} updates the curvature of param group {gi}, but no "
                "curvature was captured for it. Run the backward inside `with opt.capture(): loss.backward()` "
                "(and call opt.step() once per capture)."
            )
        return rec

    def _rollback(self) -> None:
        """After an error in the step: undo the capture's generator draws."""
        if self.core.generator_before is not None:
            self.core.generator.set_state(self.core.generator_before)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step (module docstring): plan, check, commit; returns the closure's loss."""
        try:
            self.check_groups()
            loss = self._evaluate(closure)
            plan = self._plan(loss)
            self._check(plan)
        except BaseException:
            self._rollback()
            raise
        self._commit(plan)
        self._after_commit(plan, closure)
        return loss

    def _evaluate(self, closure: Optional[Callable[[], Any]]) -> Any:
        """The closure's loss (torch's convention: with autograd enabled)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _plan(self, loss: Any) -> StepPlan:
        """Everything the step writes, without side effects (data-parallel: after averaging the
        gradients and captured curvature across ranks, in place)."""
        if self.core.distributed is not None:
            distributed.synchronize(self)
        plan = StepPlan(self.core.step, loss, [replace(s) for s in self.core.groups])
        for gi, group in enumerate(self.param_groups):
            gp = self._gather(gi, group)
            if gp.params:
                self._plan_group(plan, gp, group)
            plan.groups.append(gp)
        return plan

    def _grad(self, group: Mapping[str, Any], p: Tensor) -> Tensor:
        return p.grad

    def _gather(self, gi: int, group: Mapping[str, Any]) -> GroupPlan:
        """The group's parameters with a gradient; raises on a sparse or non-finite gradient."""
        gp = GroupPlan(gi)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = self._name(gi, i, p)
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{self._where}: {name} has a sparse gradient, which the curvature and its solvers do not "
                    "handle; the step was not taken. Create the layer with sparse=False (e.g. "
                    "nn.Embedding(..., sparse=False)), or leave the parameter to torch.optim.SparseAdam."
                )
            gp.params.append(p), gp.grads.append(self._grad(group, p)), gp.names.append(name)
        bad = first_nonfinite(gp.grads)
        if bad is not None:
            raise FloatingPointError(
                f"{self._where}: the gradient of {gp.names[bad]} contains NaN or Inf; the step was not taken "
                "and parameters and optimizer state are unchanged. Skip this batch (opt.zero_grad()) or lower "
                "the learning rate."
            )
        return gp

    def _plan_group(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any]) -> None:
        """Fill ``gp.dirs`` (and ``gp.values``, ``plan.state``, ``plan.schedule[gp.index]``)."""
        raise NotImplementedError

    def _check(self, plan: StepPlan) -> None:
        for gp in plan.groups:
            bad = first_nonfinite(gp.dirs)
            if bad is not None:
                raise FloatingPointError(
                    f"{self._where}: the {self.direction_name} of {gp.names[bad]} contains NaN or Inf; the step "
                    "was not taken and state is unchanged. Increase damping or skip this batch."
                )
            bad = first_nonfinite(gp.values or [])
            if bad is not None:
                raise FloatingPointError(
                    f"{self._where}: the update of {gp.names[bad]} is NaN or Inf; the step was not taken and "
                    "state is unchanged. Lower the learning rate or increase damping."
                )

    def _commit(self, plan: StepPlan) -> None:
        self._apply(plan)
        for p, entry in plan.state.items():
            self.state[p].update(entry)
        for p, keys in plan.drop.items():
            for key in keys:
                self.state[p].pop(key, None)
        self.core.groups[:] = plan.schedule
        self.core.solves.update(plan.solves)
        self.core.generator_before = None
        self.core.step += 1

    def _apply(self, plan: StepPlan) -> None:
        """The in-place updates of parameters, gradients or buffers (must not raise)."""
        raise NotImplementedError

    def _after_commit(self, plan: StepPlan, closure: Optional[Callable[[], Any]]) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["param_groups"] = groups_for_saving(sd["param_groups"])
        sd["curvlib"] = dict(self.core.saved(), optimizer=checkpoint.class_name(self))
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer class (this or an earlier version:
        ``state[p]["curvature"]`` is now ``state[p]["running"]``, hyper-parameters added since
        take their defaults).

        Everything is checked before anything is loaded (:mod:`curvlib.optim.checkpoint`): the
        optimizer class, the number of groups and parameters, every group's hyper-parameters
        (the table), and each parameter's state (shapes, the running curvature's structure for
        the group's curvature); a refused checkpoint raises ``ValueError`` naming the group or the
        parameter and leaves the optimizer unchanged."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlib", None)
        groups = [dict(g) for g in state_dict["param_groups"]]
        restore_callables(groups, self.param_groups)
        state = migrate_param_state(state_dict["state"])
        checkpoint.check(self, extra, groups, state)
        state_dict["param_groups"], state_dict["state"] = groups, state
        super().load_state_dict(state_dict)
        self.core.load(extra)
        self.core.solves = {}
        self.core.capture = None

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> Dict[str, Any]:
        """``copy.deepcopy`` and ``pickle``: torch's state plus the optimizer's attributes and
        ``core`` (cached inverses and a pending capture are not copied: the copy rebuilds its
        inverses from ``state[p]["inverse_of"]``, as after ``load_state_dict``)."""
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in state})
        return state


__all__ = ["CurvatureOptimizer", "CaptureTransaction", "StepPlan", "GroupPlan", "LR", "SEED", "PROCESS_GROUP", "CHECK_SYNC"]
