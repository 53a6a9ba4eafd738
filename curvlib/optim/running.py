r"""The running curvature and its damped inverse: the preconditioning of :class:`NaturalGradient`,
:class:`Preconditioner` and :class:`NoisyNaturalGradient`.

Per step ``k`` (counted from 0) and param group with a curvature:

1. ``capture()`` returns ``curvlib.curvature(*extensions, generator=...)`` when some group's
   curvature is due (``k >= next_cov``), a no-op context otherwise (a plain backward).
2. ``step()`` reads the new curvature of every parameter from its savefield, mixes it into the
   running curvature ``state[p]["running"]`` (the first capture initialises it), rebuilds the
   damped inverse when due (``k >= next_inv``, or the damping / damping mode / curvature changed),
   and computes the direction ``d_p = (C_p + λ I)^-1 g_p``; parameters without curvature (no
   adapter, or a group with ``curvature=None``) get ``d_p = g_p``. With ``kl_clip`` the group's
   direction is scaled by ``min(1, sqrt(kl_clip / sum_p lr_p^2 <d_p, g_p>))`` (``lr_p`` the learning
   rate that applies ``d_p``: the group's, or for :class:`Preconditioner` the wrapped optimizer's
   group of ``p``). A binding clip makes the step ``lr_p nu d_p`` with ``nu ∝ 1 / lr``: the
   lr cancels (docs/user_guide/optimizers.md, "kl_clip and the learning rate").
3. Nothing is written before every quantity of the step is known to be finite
   (:mod:`curvlib.optim.core`).

Intervals: ``T_cov`` / ``T_inv`` are ints, callables ``step -> int`` (evaluated at each update:
the next update is ``k + T(k)``), or for ``T_cov`` the string ``"auto"``: the interval doubles
(up to ``T_cov_max``) while the relative change of the running curvature at an update,
``||C' - C|| / ||C||`` over the group, stays below ``T_cov_auto_tol``, and halves otherwise.
The first ``curvature_warmup`` steps capture and invert at every step whatever the intervals.

Why the defaults (``T_cov=5, T_inv=20, curvature_warmup=10, kl_clip=1e-3``; measured in
``benchmarks/kfac_divergence.py``): at initialisation the damping is far above the curvature
(``tr A tr G / (dim A dim G)`` of 3e-4 .. 2e-3 per layer of a small CNN), so the damped inverse
lengthens the gradient, the weights move 25-30 % per step, the layer inputs' second moments grow
10-700x within 5 steps, and an inverse kept from the first batch overshoots by up to 140x: the loss
goes to NaN by step 10. Neither exact damping, no EMA, no momentum nor a fresh inverse at every
step prevents it; the KL clip, which bounds the step where the damping exceeds the curvature,
does, and an inverse at every capture during the first steps then lowers the loss further.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor

from curvlib.extensions.base import FISHER_TYPES
from curvlib.engine.factors import MAX_FACTOR_DIM
from curvlib.optim import distributed
from curvlib.optim.core import CurvatureOptimizer, GroupPlan, StepPlan
from curvlib.optim.curvatures import CURVATURES, CurvatureKind, options_of
from curvlib.optim.grafting import GRAFT_HYPERPARAMETERS, graft
from curvlib.optim.hyperparams import HyperParameter, Rule, defaults_of, number, one_of
from curvlib.optim.stagger import portions
from curvlib.optim.tensors import first_nonfinite, same_structure, tree_leaves, upcast, working_dtype


def _interval_rule(auto: bool) -> Rule:
    return Rule(
        lambda v, g: callable(v) or (isinstance(v, int) and v >= 1) or (auto and v == "auto"),
        "an int >= 1, a callable step -> int" + (", or \"auto\"" if auto else ""),
    )


def _stagger_ok(v: Any, g: Mapping[str, Any]) -> bool:
    """``inverse_stagger``: an int >= 1; above 1 at most an int ``T_inv`` (a callable one is checked
    at each update) and only for curvatures with per-parameter inverses."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return False
    if v == 1:
        return True
    kind = CURVATURES.get(g.get("curvature")) if isinstance(g.get("curvature"), str) else None
    t_inv = g.get("T_inv")
    return (kind is None or kind.separable) and (callable(t_inv) or v <= t_inv)


#: the hyper-parameters of the running curvature (without the curvature kinds' options)
RUNNING: Tuple[HyperParameter, ...] = (
    HyperParameter(
        "curvature", "str or None", "kfac", "the curvature (`curvlib.optim.CURVATURES`), or `None`: plain momentum SGD",
        Rule(lambda v, g: v is None or v in CURVATURES, "None or one of " + ", ".join(f'"{c}"' for c in CURVATURES),
             "unknown curvature {value!r}; use one of " + str(sorted(CURVATURES)) + " or None (plain momentum SGD "
             "for the group)."),
    ),
    HyperParameter("fisher_type", "str", "mc", "`\"type-2\"` (exact GGN), `\"mc\"` (sampled targets), `\"empirical\"`",
                   one_of(*FISHER_TYPES)),
    HyperParameter(
        "mc_samples", "int", 1, "sampled targets per datum for `\"mc\"`",
        Rule(lambda v, g: number(1, integer=True).test(v, g) and (v == 1 or g["fisher_type"] == "mc"),
             "an int >= 1 (fisher_type=\"mc\" only)",
             "{name}={value!r}: must be an int >= 1, and a value other than 1 applies to fisher_type='mc' only."),
    ),
    HyperParameter("kfac_approx", "str", "expand", "`\"expand\"` / `\"reduce\"` for weight-sharing layers",
                   one_of("expand", "reduce")),
    HyperParameter(
        "max_factor_dim", "int or None", MAX_FACTOR_DIM,
        "Kronecker curvatures: a factor side of a larger dimension is kept diagonal (1-D; a vocabulary-sized "
        "head or embedding); `kpsvd`, `deflation`, `lanczos` and `kfac-corrected` refuse such a layer; `None`: "
        "every side dense", number(1, integer=True, none=True),
    ),
    HyperParameter("damping", "float", 1e-3, "`λ`", number(0, finite=True)),
    HyperParameter("damping_mode", "str", "pi",
                   "`\"pi\"` (Martens & Grosse's factored Tikhonov) or `\"exact\"` (`C + λI`)", one_of("pi", "exact")),
    HyperParameter("T_cov", "int, callable or \"auto\"", 5, "curvature update interval (after `curvature_warmup`)",
                   _interval_rule(True)),
    HyperParameter("T_inv", "int or callable", 20, "inverse update interval (after `curvature_warmup`)",
                   _interval_rule(False)),
    HyperParameter(
        "inverse_stagger", "int", 1,
        "rebuild the group's inverses (eigenbases for `ekfac`, `eigen-adam`) at a `T_inv` update in this many "
        "portions of about equal cost, one per step from that step on, instead of all in one step: bounds the "
        "slowest step; each inverse is still rebuilt once per `T_inv` steps (`curvature_warmup` steps rebuild all)",
        Rule(_stagger_ok, "an int >= 1, at most T_inv; 1 for two-level, exact-ng and exact-ng-blocks",
             "{name}={value!r} must be an int >= 1 and at most T_inv (one portion per step of a T_inv window), "
             "and 1 for a curvature whose inverse couples the parameters (two-level, exact-ng, exact-ng-blocks)."),
    ),
    HyperParameter(
        "curvature_warmup", "int", 10,
        "the first this many steps capture the curvature and rebuild its inverse at every step (then `T_cov`, "
        "`T_inv`): early in training the layers' second moments change fastest, and an inverse kept from the "
        "initialisation overshoots", number(0, integer=True),
    ),
    HyperParameter(
        "T_cov_auto_tol", "float", 0.01,
        "`\"auto\"`: the interval doubles while the relative change of the running curvature at an update is "
        "below this, and halves otherwise", number(0, low_open=True, finite=True),
    ),
    HyperParameter("T_cov_max", "int", 64, "`\"auto\"`: largest interval", number(1, integer=True)),
    HyperParameter(
        "ema_decay", "float", 0.95, "`C <- ema_decay C + (1 - ema_decay) C_new`; the first capture initialises `C`",
        Rule(lambda v, g: 0.0 <= float(v) < 1.0, "in [0, 1)"),
    ),
    HyperParameter(
        "curvature_batch_fraction", "float", 1.0,
        "curvature from a random fraction of the batch (drawn with the optimizer's generator, the same samples "
        "for every layer, normalized as a mean over the sub-batch), in the same backward; the gradient stays the "
        "whole batch's", Rule(lambda v, g: 0.0 < float(v) <= 1.0, "in (0, 1]"),
    ),
    HyperParameter(
        "kl_clip", "float or None", 1e-3,
        "scale the group's direction by `ν = min(1, sqrt(kl_clip / sum_p lr_p^2 <d_p, g_p>))`: bounds the step "
        "where the damping exceeds the curvature; a binding clip (`ν < 1`) cancels the lr: the step is `lr ν d` with "
        "`lr ν = sqrt(kl_clip / <d, g>)`, the same for every lr (tune the pair: docs/user_guide/optimizers.md, "
        "\"kl_clip and the learning rate\"); `None`: no clipping; a group with `curvature=None` takes the "
        "plain step, unclipped",
        Rule(lambda v, g: v is None or (v > 0 and math.isfinite(v)), "> 0 and finite, or None (no clipping)"),
    ),
)

#: the table of the running-curvature core: :data:`RUNNING`, grafting and the kinds' options
CORE_HYPERPARAMETERS: Tuple[HyperParameter, ...] = RUNNING + GRAFT_HYPERPARAMETERS + options_of(CURVATURES)

#: hyper-parameters of the preconditioning core and their defaults
CORE_DEFAULTS = defaults_of(CORE_HYPERPARAMETERS)


def interval(value: Any, k: int, name: str) -> int:
    """``T_cov`` / ``T_inv`` at step ``k`` (an int, or a callable evaluated at ``k``)."""
    v = value(k) if callable(value) else value
    if not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or int(v) < 1:
        raise ValueError(f"curvlib.optim: {name} returned {v!r} at step {k}; it must be an int >= 1.")
    return int(v)


def warming(group: Mapping[str, Any], k: int) -> bool:
    """Whether step ``k + 1`` is still in the group's ``curvature_warmup`` (a capture and an
    inverse at every step)."""
    return k + 1 < int(group.get("curvature_warmup", 0))


class RunningCurvatureOptimizer(CurvatureOptimizer):
    """Base class: the running curvature, its damped inverse and ``kl_clip`` (module docstring)."""

    hyperparameters = CORE_HYPERPARAMETERS
    kinds = CURVATURES

    def check_group(self, group: Mapping[str, Any], gi: int) -> None:
        super().check_group(group, gi)
        kind = self._kind(group)
        if kind is not None and not kind.ema and group["ema_decay"] > 0:
            self._warn_once(("ema", kind.name), (
                f"curvlib.optim: curvature={kind.name!r} keeps the exact factors of the latest curvature batch; "
                "ema_decay does not apply to it (set ema_decay=0 to silence this)."
            ))

    def _switched(self, gi: int, schedule: Any = None) -> bool:
        """Whether group ``gi``'s curvature changed since its running curvature was captured
        (``curvature`` set between steps, as the README allows): the next step then captures the
        new kind and starts its running curvature afresh."""
        kind = self._kind(self.param_groups[gi])
        held = (schedule or self.core.groups[gi]).running_curvature
        return kind is not None and held is not None and held != kind.name

    def _due(self, gi: int, k: int) -> bool:
        return super()._due(gi, k) or self._switched(gi)

    def _lr_for(self, group: Mapping[str, Any], p: Tensor) -> float:
        """The learning rate ``kl_clip`` assumes for ``p``."""
        return float(group["lr"])

    def _plan_group(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any]) -> None:
        kind = self._kind(group)
        gp.dirs = list(gp.grads) if kind is None else self._precondition(plan, gp, group, kind)
        if group["graft"] is not None:
            self._graft(plan, gp, group)
        if group["kl_clip"] is not None and kind is not None:  # curvature=None: the plain step, unclipped
            # the KL of the whole update, each parameter with its own lr (Preconditioner: the
            # wrapped optimizer may give every layer its own): sum_p lr_p^2 <d_p, g_p>; one dot
            # product per parameter (float32 at least), no d * g temporaries, one synchronisation
            dots = torch.stack([
                torch.dot(d.reshape(-1).to(working_dtype(d.dtype)), g.reshape(-1).to(working_dtype(d.dtype))).double()
                for d, g in zip(gp.dirs, gp.grads)
            ]).tolist()
            kl = sum(self._lr_for(group, p) ** 2 * v for p, v in zip(gp.params, dots))
            if kl > 0:
                nu = min(1.0, math.sqrt(group["kl_clip"] / kl))
                if nu < 1.0:
                    gp.dirs = [d * nu for d in gp.dirs]

    def _state(self, plan: StepPlan, p: Tensor) -> Dict[str, Any]:
        """``opt.state[p]`` with the entries this step has planned so far."""
        return {**self.state.get(p, {}), **plan.state.get(p, {})}

    def _graft(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any]) -> None:
        """``graft``: each direction with the norm of the grafted method's step (:mod:`curvlib.optim.grafting`)."""
        states = [self._state(plan, p) for p in gp.params]
        curved = [group["curvature"] is not None and "running" in s for s in states]
        gp.dirs, entries = graft(group, gp.grads, gp.dirs, curved, states)
        for p, e in zip(gp.params, entries):
            if e:
                plan.state.setdefault(p, {}).update(e)

    def _precondition(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any], kind: CurvatureKind) -> List[Tensor]:
        """``(C_p + λ I)^-1 g_p`` for the parameters with a running curvature, ``g_p`` for the others."""
        fresh = plan.step >= plan.schedule[gp.index].next_cov
        curvs = self._running(plan, gp, group, kind)
        if kind.stateful:
            return self._in_basis(plan, gp, group, kind, curvs, fresh)
        has = [c is not None for c in curvs]
        cparams = [p for p, h in zip(gp.params, has) if h]
        if not cparams:
            return list(gp.grads)
        names = [n for n, h in zip(gp.names, has) if h]
        solve = self._inverse(plan, gp.index, group, kind, cparams, [c for c in curvs if c is not None], names)
        record = self._captured()
        extras = kind.extras(group, record.extensions) if record is not None else {}
        # float16 / bfloat16 parameters: solved in their curvature's float32, cast back
        cgrads = [g.to(working_dtype(g.dtype)) for g, h in zip(gp.grads, has) if h]
        cdirs = iter(solve(cgrads, extras))
        return [next(cdirs).to(g.dtype) if h else g for g, h in zip(gp.grads, has)]

    def _in_basis(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any], kind: Any, curvs: List[Any],
                  fresh: bool) -> List[Tensor]:
        """The directions of a stateful kind (:mod:`curvlib.optim.eigenbasis`): ``kind.direction``
        per parameter with a running curvature (its eigenbasis refreshed when ``T_inv`` is due),
        ``g_p`` for the others."""
        k, gs = plan.step, plan.schedule[gp.index]
        refresh = k >= gs.next_inv
        held = [(p, c) for p, c in zip(gp.params, curvs) if c is not None]
        due = self._stagger_due(plan, gp.index, group, kind, [p for p, _ in held], [c for _, c in held])
        dirs = []
        for p, g, c, n in zip(gp.params, gp.grads, curvs, gp.names):
            if c is None:
                dirs.append(g)
                continue
            now = refresh if due is None else id(p) in due
            d, entries = kind.direction(p, g, c, self._state(plan, p), fresh, now, group, n)
            plan.state.setdefault(p, {}).update(entries)
            dirs.append(d.to(g.dtype))
        if refresh and due is None:
            gs.next_inv = k + interval(group["T_inv"], k, "T_inv")
            gs.inv_updates += 1
        return dirs

    def _running(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any], kind: CurvatureKind) -> List[Any]:
        """Each parameter's running curvature after this step (``None``: it has none); on a
        curvature step, mixes in the captured one and advances the group's ``T_cov`` schedule."""
        k, gs = plan.step, plan.schedule[gp.index]
        switched = self._switched(gp.index, gs)
        cov_due = k >= gs.next_cov or switched
        record = self._require_capture(gp.index) if cov_due else None
        if record is not None and kind.savefield not in {e.savefield for e in record.extensions}:
            raise RuntimeError(
                f"{self._where}: param group {gp.index} has curvature={kind.name!r}, but the capture of step {k} "
                "was taken for another curvature (changed between opt.capture() and opt.step()); change "
                "`curvature` before opt.capture()."
            )
        curvs: List[Any] = []
        num = den = 0.0
        for p, n in zip(gp.params, gp.names):
            old = None if switched else self.state.get(p, {}).get("running")
            old = None if old is None else upcast(old)  # float16 / bfloat16 models: float32 curvature
            if not cov_due:
                if old is None:
                    self._warn_plain(n, kind.name, p)
                curvs.append(old)
                continue
            new = kind.read(p, group)
            new = None if new is None else upcast(new)
            if new is None:
                self._warn_plain(n, kind.name, p)
                self._drop_stale(plan, p, kind)
                curvs.append(None)
                continue
            if first_nonfinite(tree_leaves(new)) is not None:
                raise FloatingPointError(
                    f"{self._where}: the captured {kind.name!r} curvature of {n} contains NaN or Inf; the step was "
                    "not taken and state is unchanged. Skip this batch."
                )
            first = old is None or not same_structure(old, new)
            run = new if first or not kind.ema else kind.mix(old, new, float(group["ema_decay"]))
            if not first and group["T_cov"] == "auto":
                num += sum(float((a - b).square().sum()) for a, b in zip(tree_leaves(run), tree_leaves(old)))
                den += sum(float(b.square().sum()) for b in tree_leaves(old))
            plan.state.setdefault(p, {}).update(running=run, **kind.after_read(p, record.extensions))
            if not kind.ema:  # per-sample factors: remember their batch (the capture step)
                plan.state[p]["batch"] = k
            curvs.append(run)
        if cov_due:
            seen = {id(p) for p in gp.params}
            for p in group["params"]:  # not used in this batch (no gradient)
                if id(p) not in seen:
                    self._drop_stale(plan, p, kind)
            gs.running_curvature = kind.name
            gs.cov_updates += 1
            gs.last_change = math.sqrt(num / den) if den > 0 else None
            if warming(group, k):
                gs.next_cov = k + 1
            elif group["T_cov"] == "auto":
                if gs.last_change is not None:
                    grow = gs.last_change < group["T_cov_auto_tol"]
                    gs.cov_interval = min(2 * gs.cov_interval, int(group["T_cov_max"])) if grow else max(1, gs.cov_interval // 2)
                gs.next_cov = k + gs.cov_interval
            else:
                gs.next_cov = k + interval(group["T_cov"], k, "T_cov")
        return curvs

    def _drop_stale(self, plan: StepPlan, p: Tensor, kind: CurvatureKind) -> None:
        """On a capture step, forget the curvature of ``p`` (not captured in this batch) when it is
        per-sample data (``exact-ng*``: factors ``U`` whose rows are the samples of the batch they
        came from; combining them with this batch's rows, or solving with them at all next to this
        batch's factors, mixes two batches sample by sample). ``p`` then takes the plain step
        until a capture sees it again. Moving averages (``kind.ema``) keep theirs."""
        if not kind.ema and p in self.state and "running" in self.state[p]:
            plan.drop[p] = ("running", "inverse_of", "batch", "inverse_batch")

    def _inverse(self, plan: StepPlan, gi: int, group: Mapping[str, Any], kind: CurvatureKind, params, curvs,
                 names: Optional[List[str]] = None):
        """The group's damped inverse: the cached one, or one built now (from the running
        curvature when ``T_inv`` is due, else from the curvature the cached one was built from,
        ``state[p]["inverse_of"]``, e.g. for a new damping or after ``load_state_dict``); with
        ``inverse_stagger``, a portion of the parameters' inverses (:meth:`_staggered_inverse`)."""
        k, gs = plan.step, plan.schedule[gi]
        key = (kind.name, tuple(id(p) for p in params))
        cached = self.core.solves.get(gi)
        lam, mode = float(group["damping"]), group["damping_mode"]
        scheduled = k >= gs.next_inv
        same_setup = gs.inv_damping == lam and gs.inv_mode == mode and gs.inv_curvature == kind.name
        due = self._stagger_due(plan, gi, group, kind, params, curvs)
        if due is not None:
            if not due and cached is not None and cached[0] == key and same_setup:
                return cached[1]  # staggering, nothing due at this step
            return self._staggered_inverse(plan, gi, group, kind, params, curvs, names, due, same_setup)
        if not scheduled and cached is not None and cached[0] == key and same_setup:
            return cached[1]
        snapshot = [self.state.get(p, {}).get("inverse_of") for p in params]
        if gs.inv_curvature not in (None, kind.name):
            resumable = False
        elif kind.ema:
            resumable = all(s is not None and same_structure(s, c) for s, c in zip(snapshot, curvs))
        else:  # per-sample factors (rows: the samples of any batch size): the snapshots must share one batch
            batches = {self.state.get(p, {}).get("inverse_batch") for p in params}
            resumable = len(batches) == 1 and None not in batches and None not in snapshot
        if scheduled or not resumable:
            sources, lam_build = curvs, lam  # a new inverse of the running curvature
        else:  # same curvature snapshot, new damping / mode, or rebuilt after load_state_dict
            sources = snapshot
            lam_build = gs.inv_damping_used if same_setup and gs.inv_damping_used else lam
        solve, used = distributed.build_inverse(
            self.core.distributed, kind, params, sources, lam_build, mode, group, f"param group {gi}", names
        )
        plan.solves[gi] = (key, solve)
        for p, c in zip(params, sources):
            entry = plan.state.setdefault(p, {})
            if not kind.ema:
                batch = entry.get("batch", self.state.get(p, {}).get("batch"))
                entry["inverse_batch"] = batch if sources is curvs else self.state[p].get("inverse_batch")
            entry["inverse_of"] = c
        # rank-2 Kronecker inverses of indefinite sums: eigenvalue pairs raised to the damping
        # floor (KroneckerInverse.clipped; announced once by the solver)
        for p, part in zip(params, solve.parts or []):
            clipped: Optional[int] = getattr(part, "clipped", None)
            if clipped is not None:
                plan.state[p]["inverse_clipped"] = int(clipped)
        if scheduled:
            gs.next_inv = k + 1 if warming(group, k) else k + interval(group["T_inv"], k, "T_inv")
            gs.inv_updates += 1
        gs.inv_damping, gs.inv_damping_used = lam, used
        gs.inv_mode, gs.inv_curvature = mode, kind.name
        return solve

    def _stagger_due(self, plan: StepPlan, gi: int, group: Mapping[str, Any], kind: CurvatureKind, params,
                     curvs) -> Optional[Set[int]]:
        """``inverse_stagger`` (:mod:`curvlib.optim.stagger`): the ids of the parameters whose
        inverse is rebuilt at this step (a window's first step also advances the group's ``T_inv``
        schedule and splits ``params``, those with a curvature, into its portions); ``None`` when
        the group does not stagger now (the caller rebuilds every inverse when ``T_inv`` is due)."""
        k, gs = plan.step, plan.schedule[gi]
        n = int(group["inverse_stagger"])
        if warming(group, k):  # every inverse at every step
            gs.inv_pending = []
            return None
        if not kind.separable or (n == 1 and not gs.inv_pending):
            return None
        pending = [list(portion) for portion in gs.inv_pending]
        due: Set[int] = set()
        if k >= gs.next_inv:  # a window begins
            t = interval(group["T_inv"], k, "T_inv")
            if n > t:
                raise ValueError(
                    f"{self._where}: param group {gi}: inverse_stagger={n} is above T_inv={t} (returned by the "
                    f"T_inv callable at step {k}): a window of T_inv steps has room for at most T_inv portions; "
                    "lower inverse_stagger or return a larger interval."
                )
            due.update(i for portion in pending for i in portion)  # the rest of a window cut short
            index = {id(p): i for i, p in enumerate(group["params"])}
            split = portions([kind.inverse_cost(c, group["damping_mode"]) for c in curvs], n)
            pending = [[index[id(params[j])] for j in portion] for portion in split]
            gs.next_inv = k + t
            gs.inv_updates += 1
        if pending:
            due.update(pending.pop(0))
        gs.inv_pending = pending
        return {id(group["params"][i]) for i in due}

    def _staggered_inverse(self, plan: StepPlan, gi: int, group: Mapping[str, Any], kind: CurvatureKind, params,
                           curvs, names: Optional[List[str]], due: Set[int], same_setup: bool):
        """The group's inverse with ``inverse_stagger``: the parameters in ``due`` get inverses of
        their running curvature, the others keep theirs (the cached parts; after ``load_state_dict``,
        a new damping or in a copy: rebuilt from ``state[p]["inverse_of"]`` with the damping they
        were built with, ``state[p]["inverse_damping"]``, or the new one)."""
        gs = plan.schedule[gi]
        lam, mode = float(group["damping"]), group["damping_mode"]
        before = gs.inv_damping_used if same_setup and gs.inv_damping_used else lam  # of a build of all
        cached = self.core.solves.get(gi)
        held: Dict[int, Any] = {}
        if cached is not None and cached[0][0] == kind.name and cached[1].parts is not None and same_setup:
            held = dict(zip(cached[0][1], cached[1].parts))
        # what each parameter's inverse is built from now: (source, damping), or None (kept)
        builds: List[Optional[Tuple[Any, float]]] = []
        for p, c in zip(params, curvs):
            s = self.state.get(p, {})
            snapshot = s.get("inverse_of")
            if id(p) in due or snapshot is None or not same_structure(snapshot, c):
                builds.append((c, lam))
            elif id(p) in held:
                builds.append(None)
                if "inverse_damping" not in s:  # built with the whole group (warm-up, no staggering)
                    plan.state.setdefault(p, {})["inverse_damping"] = float(before)
            else:
                builds.append((snapshot, float(s.get("inverse_damping", before)) if same_setup else lam))
        parts: List[Any] = [None if b is not None else held[id(p)] for p, b in zip(params, builds)]
        used_all = gs.inv_damping_used if same_setup else None
        for lam_build in sorted({b[1] for b in builds if b is not None}):
            js = [j for j, b in enumerate(builds) if b is not None and b[1] == lam_build]
            solve, used = distributed.build_inverse(
                self.core.distributed, kind, [params[j] for j in js], [builds[j][0] for j in js], lam_build, mode,
                group, f"param group {gi}", None if names is None else [names[j] for j in js],
            )
            used_all = used if used_all is None else max(used_all, used)
            for j, part in zip(js, solve.parts):
                parts[j] = part
                entry = plan.state.setdefault(params[j], {})
                entry.update(inverse_of=builds[j][0], inverse_damping=float(used))
                clipped: Optional[int] = getattr(part, "clipped", None)
                if clipped is not None:
                    entry["inverse_clipped"] = int(clipped)
        solve = kind.solve_from_parts(params, parts)
        plan.solves[gi] = ((kind.name, tuple(id(p) for p in params)), solve)
        gs.inv_damping, gs.inv_damping_used = lam, used_all
        gs.inv_mode, gs.inv_curvature = mode, kind.name
        return solve


__all__ = ["RunningCurvatureOptimizer", "CORE_HYPERPARAMETERS", "CORE_DEFAULTS", "RUNNING", "interval", "warming"]
