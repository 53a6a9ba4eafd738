r"""The preconditioning core shared by :class:`Preconditioner` and ``NaturalGradient``.

Per step ``k`` (counted from 0) and param group:

1. ``capture()`` returns ``curvlib.curvature(*extensions, generator=...)`` when some group's
   curvature is due (``k >= next_cov``), a no-op context otherwise (a plain backward).
2. ``step()`` reads the new curvature of every parameter from its savefield, mixes it into the
   running curvature (the first capture initialises it), rebuilds the damped inverse when due
   (``k >= next_inv``, or the damping / damping mode / curvature changed), and computes the
   direction ``d_p = (C_p + λ I)^-1 g_p``; parameters without curvature (no adapter, or a group
   with ``curvature=None``) get ``d_p = g_p``. With ``kl_clip`` the group's direction is scaled by
   ``min(1, sqrt(kl_clip / (lr^2 sum_p <d_p, g_p>)))``.
3. Nothing is written before every quantity of the step is known to be finite: a non-finite
   gradient, curvature or direction raises ``FloatingPointError`` naming the parameter and leaves
   parameters, optimizer state and the generator as they were before the step's capture.

Intervals: ``T_cov`` / ``T_inv`` are ints, callables ``step -> int`` (evaluated at each update:
the next update is ``k + T(k)``), or for ``T_cov`` the string ``"auto"``: the interval doubles
(up to ``T_cov_max``) while the relative change of the running curvature at an update,
``||C' - C|| / ||C||`` over the group, stays below ``T_cov_auto_tol``, and halves otherwise.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlib.engine import curvature as curvature_context
from curvlib.extensions import GGNMP, KFAC, KPSVD, SubBatch
from curvlib.extensions.base import FISHER_TYPES
from curvlib.extensions.sub_batch import SubBatchSampler
from curvlib.optim import state as st
from curvlib.optim.curvatures import Curvature, curvature_for, tree_leaves
from curvlib.optim.damping import robust_inverse
from curvlib.optim.distributed import AUTO, LOSS, ROWS, data_parallel
from curvlib.solvers.two_level import COARSE_SPACES

#: hyper-parameters of the preconditioning core and their defaults
CORE_DEFAULTS: Dict[str, Any] = dict(
    curvature="kfac",
    fisher_type="mc",
    mc_samples=1,
    kfac_approx="expand",
    rank=None,
    damping=1e-3,
    damping_mode="pi",
    T_cov=1,
    T_inv=1,
    T_cov_auto_tol=0.01,
    T_cov_max=64,
    ema_decay=0.95,
    curvature_batch_fraction=1.0,
    kl_clip=None,
    coarse_space="nicolaides",
    krylov=False,
    coarse_damping=0.0,
)


def _finite(t: Tensor) -> bool:
    """One reduction: a tensor with a NaN or Inf entry has a non-finite sum (an overflowing
    sum of finite entries is checked element-wise)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _Capture:
    """The context ``opt.capture()`` returns on curvature-update steps."""

    def __init__(self, opt: "CurvatureOptimizer", extensions: List[Any], step: int):
        self.opt, self.extensions, self.step = opt, extensions, step
        # data-parallel: MC targets from a generator seeded per rank (from the shared generator)
        self.gen = opt._generator if opt._dp is None else torch.Generator()
        # data-parallel: non-finite captures are stored, and step() fails on every rank at once
        self.ctx = curvature_context(*extensions, generator=self.gen, check_finite=opt._dp is None)

    def _begin(self) -> None:
        opt = self.opt
        opt._gen_before = st.generator_state(opt._generator)
        if opt._dp is not None:
            opt._dp.seed(self.gen, opt._generator)

    def __enter__(self):
        opt = self.opt
        self._begin()
        for group in opt.param_groups:
            curv = curvature_for(group["curvature"])
            for p in group["params"]:
                for ext in self.extensions:  # stale values of an earlier step must not be read
                    p.__dict__.pop(ext.savefield, None)
                warm = opt.state.get(p, {}).get("kpsvd_warm") if curv is not None else None
                for ext in self.extensions:
                    if isinstance(_inner(ext), KPSVD):
                        _inner(ext).set_warm_factors(p, warm)
        self.ctx.__enter__()
        return self.ctx

    def __exit__(self, exc_type, exc, tb):
        try:
            self.ctx.__exit__(exc_type, exc, tb)
        except BaseException:
            self.opt._restore_generator()
            raise
        if exc_type is not None:
            self.opt._restore_generator()
            return False
        self.opt._captured = (self.step, self.extensions)
        self.opt._capture_ctx = self.ctx
        return False


class CurvatureOptimizer(Optimizer):
    """Base class: param groups, capture, running curvature, inverses and directions.

    Subclasses implement ``step``; they call :meth:`_directions` (no side effects) and then
    :meth:`_commit` with what it returned.
    """

    def __init__(
        self, params, defaults: Dict[str, Any], seed: Optional[int] = None, process_group: Any = AUTO,
        check_sync: bool = False,
    ):
        self._groups: List[Dict[str, Any]] = []
        self._ema_warned: set = set()  # (set before the groups are added)
        self._dp = None
        super().__init__(params, defaults)
        #: the data-parallel helper (:mod:`curvlib.optim.distributed`), None in one process
        self._dp = data_parallel(process_group, check_sync)
        if self._dp is not None:
            for gi, g in enumerate(self.param_groups):
                self._check_distributed(g, gi)
        self._capture_ctx: Any = None
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator().manual_seed(int(seed))
        self._step = 0
        self._captured: Optional[Tuple[int, List[Any]]] = None
        self._gen_before: Optional[Tensor] = None
        self._solves: Dict[int, Any] = {}
        self._warned: set = set()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1], len(self.param_groups) - 1)
        if self._dp is not None:
            self._check_distributed(self.param_groups[-1], len(self.param_groups) - 1)
        self._groups.append(st.new_group_state())

    @property
    def distributed(self):
        """The :class:`~curvlib.optim.distributed.DataParallel` helper (rank, world size, the
        communication ``stats`` and the ``last`` step's bytes), or ``None`` in one process."""
        return self._dp

    def _check_distributed(self, g: Dict[str, Any], gi: int) -> None:
        curv = curvature_for(g["curvature"])
        if curv is not None and not curv.distributed:
            raise NotImplementedError(
                f"curvlib.optim: param group {gi}: curvature={curv.name!r} cannot run data-parallel yet: "
                "the curvature of the concatenated batch is not a combination of the per-process ones "
                "(a best Kronecker approximation, a whole-network operator or per-sample factors). Use "
                "curvature='kfac' or 'diag' with torch.distributed, or process_group=None to run each "
                "process on its own."
            )

    def _validate(self, g: Dict[str, Any], gi: int) -> None:
        where = f"curvlib.optim: param group {gi}"
        curv = curvature_for(g["curvature"])
        if g["fisher_type"] not in FISHER_TYPES:
            raise ValueError(f"{where}: fisher_type={g['fisher_type']!r} is not one of {FISHER_TYPES}.")
        if g["mc_samples"] != 1 and g["fisher_type"] != "mc":
            raise ValueError(
                f"{where}: mc_samples={g['mc_samples']!r} applies to fisher_type='mc' only; leave it "
                "at 1 or use fisher_type='mc'."
            )
        if g["damping_mode"] not in ("pi", "exact"):
            raise ValueError(f"{where}: damping_mode={g['damping_mode']!r}; use 'pi' or 'exact'.")
        if not (isinstance(g["damping"], (int, float)) and g["damping"] >= 0 and math.isfinite(g["damping"])):
            raise ValueError(f"{where}: damping={g['damping']!r} must be a finite number >= 0.")
        for name in ("T_cov", "T_inv"):
            v = g[name]
            ok = callable(v) or (isinstance(v, int) and v >= 1) or (name == "T_cov" and v == "auto")
            if not ok:
                raise ValueError(
                    f"{where}: {name}={v!r}; use an int >= 1, a callable step -> int"
                    + (", or 'auto'." if name == "T_cov" else ".")
                )
        if not 0.0 <= float(g["ema_decay"]) < 1.0:
            raise ValueError(f"{where}: ema_decay={g['ema_decay']!r} must be in [0, 1).")
        if g["kl_clip"] is not None and not g["kl_clip"] > 0:
            raise ValueError(f"{where}: kl_clip={g['kl_clip']!r} must be > 0 or None (no clipping).")
        if not 0.0 < float(g["curvature_batch_fraction"]) <= 1.0:
            raise ValueError(f"{where}: curvature_batch_fraction={g['curvature_batch_fraction']!r} must be in (0, 1].")
        if g["coarse_space"] not in COARSE_SPACES:
            raise ValueError(f"{where}: coarse_space={g['coarse_space']!r} is not one of {COARSE_SPACES}.")
        if curv is not None and curv.name.startswith("exact-ng") and g["damping"] <= 0:
            raise ValueError(f"{where}: curvature={curv.name!r} needs damping > 0 (Woodbury identity).")
        if curv is not None and hasattr(curv, "rank"):
            curv.rank(g)
        if curv is not None and not curv.ema and g["ema_decay"] > 0 and curv.name not in self._ema_warned:
            self._ema_warned.add(curv.name)
            warnings.warn(
                f"curvlib.optim: curvature={curv.name!r} keeps the exact factors of the latest curvature "
                "batch; ema_decay does not apply to it (set ema_decay=0 to silence this).",
                UserWarning,
                stacklevel=4,
            )

    def _name(self, gi: int, i: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        if names is not None:
            return repr(names[i])
        return f"parameter {i} of param group {gi} (shape {tuple(p.shape)})"

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _interval(value, k: int, name: str) -> int:
        v = value(k) if callable(value) else value
        if not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or int(v) < 1:
            raise ValueError(f"curvlib.optim: {name} returned {v!r} at step {k}; it must be an int >= 1.")
        return int(v)

    def _cov_due(self, gi: int, k: int) -> bool:
        g = self.param_groups[gi]
        return curvature_for(g["curvature"]) is not None and k >= self._groups[gi]["next_cov"]

    def _extensions_due(self, k: int) -> List[Any]:
        exts: Dict[Any, Any] = {}
        by_field: Dict[str, Any] = {}
        samplers: Dict[float, SubBatchSampler] = {}
        for gi, g in enumerate(self.param_groups):
            if not self._cov_due(gi, k):
                continue
            frac = float(g["curvature_batch_fraction"])
            for ext in curvature_for(g["curvature"]).extensions(g):
                key = (type(ext), repr(ext), getattr(ext, "kfac_approx", None), getattr(ext, "cross", None) is not None, frac)
                if frac < 1.0:
                    sampler = samplers.setdefault(frac, SubBatchSampler(frac, self._generator))
                    ext = SubBatch(ext, frac, sampler=sampler)
                if key in exts:
                    continue
                other = by_field.get(ext.savefield)
                if other is not None:
                    raise ValueError(
                        f"curvlib.optim: two param groups need {other!r} and {ext!r}, which write the same "
                        f"attribute p.{ext.savefield}; give groups with the same curvature family the same "
                        "fisher_type, mc_samples, kfac_approx and rank."
                    )
                exts[key] = by_field[ext.savefield] = ext
        return list(exts.values())

    # ------------------------------------------------------------------ capture
    def capture(self):
        """The context to run ``loss.backward()`` in: a ``curvlib.curvature`` with the extensions
        the groups due for a curvature update need (drawing MC targets from the optimizer's
        generator), or a no-op context on steps without a curvature update."""
        exts = self._extensions_due(self._step)
        if not exts:
            return contextlib.nullcontext()
        return _Capture(self, exts, self._step)

    def _restore_generator(self) -> None:
        if self._gen_before is not None:
            self._generator.set_state(self._gen_before)

    # ------------------------------------------------------------------ directions
    def _lr_for(self, group: Dict[str, Any], p: Tensor) -> float:
        return float(group["lr"])

    def _grad(self, group: Dict[str, Any], p: Tensor) -> Tensor:
        return p.grad

    # ------------------------------------------------------------------ data-parallel
    def _roles(self, name: str, p: Tensor, value: Any, ext: Any) -> List[str]:
        """:data:`LOSS` / :data:`ROWS` per leaf of ``p``'s captured curvature (distributed.py)."""
        if not isinstance(value, list) or len(value) == 1:
            return [LOSS]
        ia = getattr(ext, "act_index", {}).get(id(p))
        if ia is None:
            raise RuntimeError(
                f"curvlib.optim: cannot tell which factor of the captured {name!r} curvature of a "
                f"parameter of shape {tuple(p.shape)} is the activation factor A; data-parallel averaging "
                "needs it."
            )
        return [ROWS if i == ia else LOSS for i in range(len(value))]

    def _curvature_entries(self, k: int) -> List[Tuple[Tensor, str, Any, List[str], int, bool]]:
        """This step's captured curvature to average: ``(p, savefield, value, roles, rows, sym)``."""
        if self._captured is None or self._captured[0] != k:
            return []
        out = []
        exts = self._captured[1]
        for gi, group in enumerate(self.param_groups):
            if not self._cov_due(gi, k):
                continue
            curv = curvature_for(group["curvature"])
            ext = next((e for e in exts if e.savefield == curv.savefield), None)
            counts = self._capture_ctx.counts(ext) if ext is not None else {}
            for p in group["params"]:
                value = p.__dict__.get(curv.savefield) if p.grad is not None else None
                if value is None:
                    continue
                roles = self._roles(curv.name, p, value, _inner(ext))
                out.append((p, curv.savefield, value, roles, counts.get(id(p), 1), curv.name != "diag"))
        return out

    def _sync(self, entries: List[Tuple[Tensor, str, Any, List[str], int, bool]]) -> None:
        """Data-parallel: agree on failures, then average the gradients (when not synchronized
        by DDP) and the captured curvature ``entries`` in one bucket, in place (p.grad and the
        savefields); see :mod:`curvlib.optim.distributed`."""
        dp, k = self._dp, self._step
        params = [p for g in self.param_groups for p in g["params"]]
        with_grad = [p for p in params if p.grad is not None]
        bad = any(not _finite(p.grad) for p in with_grad) or any(
            not _finite(t) for e in entries for t in tree_leaves(e[2])
        )
        layout = sum(p.grad.numel() for p in with_grad) + sum(t.numel() for e in entries for t in tree_leaves(e[2]))
        synced = dp.agree(k, bad, layout, [p.grad for p in with_grad], params)
        grads, values = dp.reduce([p.grad for p in with_grad], [e[2:] for e in entries], not synced)
        if not synced:
            for p, g in zip(with_grad, grads):
                p.grad.copy_(g)
        for e, v in zip(entries, values):
            setattr(e[0], e[1], v)

    def _build_inverse(self, curv: Curvature, params, sources, lam: float, mode: str, group, where: str):
        """``robust_inverse``; data-parallel: each parameter's inverse built on one rank (by
        cost) and broadcast."""
        if self._dp is None:
            return robust_inverse(curv, params, sources, lam, mode, group, where)

        def build(i):
            solve, used = robust_inverse(curv, [params[i]], [sources[i]], lam, mode, group, where)
            return solve.parts[0], used

        def terms_of(value, dtype):
            if not isinstance(value, list):
                return None
            terms = [value] if isinstance(value[0], Tensor) else value
            return [[t.to(dtype) for t in term] for term in terms]

        costs = [curv.inverse_cost(c, mode) for c in sources]
        parts, used = self._dp.sharded_inverses(build, sources, costs, terms_of)
        return curv.solve_from_parts(params, parts), used

    def _directions(self) -> Dict[str, Any]:
        """Everything the step needs, computed without changing any optimizer state
        (data-parallel: after averaging the gradients and captured curvature across ranks).

        Returns ``{"groups": [...], "state": {p: {key: value}}, "groups_state": [...]}``; each group
        entry has ``params``, ``grads`` and ``dirs`` (lists, parameters with a gradient).
        """
        k = self._step
        if self._dp is not None:
            self._sync(self._curvature_entries(k))
        captured = self._captured is not None and self._captured[0] == k
        pending: Dict[Tensor, Dict[str, Any]] = {}
        new_groups = [dict(s) for s in self._groups]
        out_groups = []
        new_solves: Dict[int, Any] = {}
        for gi, group in enumerate(self.param_groups):
            params, grads, names = [], [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"curvlib.optim: {self._name(gi, i, p)} has a sparse gradient; unsupported.")
                g = self._grad(group, p)
                if not _finite(g):
                    raise FloatingPointError(
                        f"curvlib.optim: the gradient of {self._name(gi, i, p)} contains NaN or Inf; the step "
                        "was not taken and parameters and optimizer state are unchanged. Skip this batch "
                        "(opt.zero_grad()) or lower the learning rate."
                    )
                params.append(p), grads.append(g), names.append(self._name(gi, i, p))
            curv = curvature_for(group["curvature"])
            dirs = list(grads)
            if curv is not None and params:
                dirs = self._precondition(gi, group, curv, params, grads, names, captured, pending, new_groups, new_solves)
            for d, n in zip(dirs, names):
                if not _finite(d):
                    raise FloatingPointError(
                        f"curvlib.optim: the preconditioned direction of {n} contains NaN or Inf; the step "
                        "was not taken and state is unchanged. Increase damping or skip this batch."
                    )
            if group["kl_clip"] is not None and params:
                vg = sum(float((d * g).sum()) for d, g in zip(dirs, grads))
                lr = self._lr_for(group, params[0])
                if vg > 0 and lr > 0:
                    nu = min(1.0, math.sqrt(group["kl_clip"] / (lr * lr * vg)))
                    if nu < 1.0:
                        dirs = [d * nu for d in dirs]
            out_groups.append({"params": params, "grads": grads, "dirs": dirs, "names": names})
        return {"groups": out_groups, "state": pending, "groups_state": new_groups, "solves": new_solves}

    def _precondition(self, gi, group, curv: Curvature, params, grads, names, captured, pending, new_groups, new_solves):
        k = self._step
        gs = new_groups[gi]
        cov_due = k >= gs["next_cov"]
        if cov_due and not captured:
            raise RuntimeError(
                f"curvlib.optim: step {k} updates the curvature of param group {gi}, but no curvature was "
                "captured for it. Run the backward inside `with opt.capture(): loss.backward()` "
                "(and call opt.step() once per capture)."
            )
        exts = self._captured[1] if captured else []
        has: List[bool] = []
        curvs: List[Any] = []
        num = den = 0.0
        for p, n in zip(params, names):
            old = self.state.get(p, {}).get("curvature")
            if cov_due:
                new = curv.read(p, group)
                if new is None:
                    self._warn_plain(n, curv.name)
                    has.append(False)
                    curvs.append(None)
                    continue
                for t in tree_leaves(new):
                    if not _finite(t):
                        raise FloatingPointError(
                            f"curvlib.optim: the captured {curv.name!r} curvature of {n} contains NaN or Inf; "
                            "the step was not taken and state is unchanged. Skip this batch."
                        )
                first = old is None or not _same_structure(old, new)
                run = new if first or not curv.ema else curv.mix(old, new, float(group["ema_decay"]))
                if not first and group["T_cov"] == "auto":
                    num += sum(float((a - b).square().sum()) for a, b in zip(tree_leaves(run), tree_leaves(old)))
                    den += sum(float(b.square().sum()) for b in tree_leaves(old))
                entry = pending.setdefault(p, {})
                entry["curvature"] = run
                for ext in map(_inner, exts):
                    if isinstance(ext, KPSVD) and ext.warm_factors(p) is not None:
                        entry["kpsvd_warm"] = ext.warm_factors(p)
                has.append(True)
                curvs.append(run)
            else:
                has.append(old is not None)
                curvs.append(old)
                if old is None:
                    self._warn_plain(n, curv.name)
        if cov_due:
            gs["cov_updates"] += 1
            change = math.sqrt(num / den) if den > 0 else None
            gs["last_change"] = change
            if group["T_cov"] == "auto":
                if change is not None:
                    if change < group["T_cov_auto_tol"]:
                        gs["cov_interval"] = min(2 * gs["cov_interval"], int(group["T_cov_max"]))
                    else:
                        gs["cov_interval"] = max(1, gs["cov_interval"] // 2)
                interval = gs["cov_interval"]
            else:
                interval = self._interval(group["T_cov"], k, "T_cov")
            gs["next_cov"] = k + interval
        cparams = [p for p, h in zip(params, has) if h]
        if not cparams:
            return list(grads)
        ccurvs = [c for c, h in zip(curvs, has) if h]
        cgrads = [g for g, h in zip(grads, has) if h]
        key = (curv.name, tuple(id(p) for p in cparams))
        cached = self._solves.get(gi)
        lam, mode = float(group["damping"]), group["damping_mode"]
        scheduled = k >= gs["next_inv"]
        same_setup = gs["inv_damping"] == lam and gs["inv_mode"] == mode and gs["inv_curvature"] == curv.name
        if not scheduled and cached is not None and cached[0] == key and same_setup:
            solve = cached[1]
        else:
            snapshot = [self.state.get(p, {}).get("inverse_of") for p in cparams]
            resumable = all(s is not None and _same_structure(s, c) for s, c in zip(snapshot, ccurvs))
            if scheduled or not resumable:
                sources, lam_build = ccurvs, lam  # a new inverse of the running curvature
            else:  # same curvature snapshot, new damping / mode, or rebuilt after load_state_dict
                sources = snapshot
                lam_build = gs["inv_damping_used"] if same_setup and gs["inv_damping_used"] else lam
            solve, used = self._build_inverse(curv, cparams, sources, lam_build, mode, group, f"param group {gi}")
            new_solves[gi] = (key, solve)
            for p, c in zip(cparams, sources):
                pending.setdefault(p, {})["inverse_of"] = c
            # rank-2 Kronecker inverses of indefinite sums: eigenvalue pairs raised to the damping
            # floor (KroneckerInverse.clipped; announced once by the solver)
            for p, part in zip(cparams, solve.parts or []):
                clipped = getattr(part, "clipped", None)
                if clipped is not None:
                    pending[p]["inverse_clipped"] = int(clipped)
            if scheduled:
                gs["next_inv"] = k + self._interval(group["T_inv"], k, "T_inv")
                gs["inv_updates"] += 1
            gs["inv_damping"], gs["inv_damping_used"] = lam, used
            gs["inv_mode"], gs["inv_curvature"] = mode, curv.name
        extras: Dict[str, Any] = {}
        if captured and curv.name == "two-level":
            extras = self._two_level_extras(group, exts)
        cdirs = solve(cgrads, extras)
        out, it = [], iter(cdirs)
        for g, h in zip(grads, has):
            out.append(next(it).to(g.dtype) if h else g)
        return out

    def _two_level_extras(self, group, exts) -> Dict[str, Any]:
        exts = [_inner(e) for e in exts]
        ggn = [e for e in exts if isinstance(e, GGNMP)]
        if not ggn:
            raise RuntimeError(
                "curvlib.optim: two-level needs the whole-network GGN operator of the capture step; "
                "run the backward inside `with opt.capture():`."
            )
        extras: Dict[str, Any] = {"operator": ggn[0].operator()}
        if group["coarse_space"] == "tpselepedis":
            kf = [e for e in exts if isinstance(e, KFAC) and e.cross is not None]
            if not kf:
                raise RuntimeError("curvlib.optim: two-level 'tpselepedis' needs KFAC(cross_layer=True) in the capture.")
            extras["cross"] = kf[0].cross
        return extras

    def _warn_plain(self, name: str, curv: str) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        warnings.warn(
            f"curvlib.optim: {name} gets no {curv!r} curvature (its layer has no curvlib adapter or was "
            "not extended); it takes the plain (momentum-SGD) step.",
            UserWarning,
            stacklevel=4,
        )

    def _commit_state(self, plan: Dict[str, Any]) -> None:
        """Write the curvature / inverse state computed by :meth:`_directions`."""
        for p, entry in plan["state"].items():
            self.state[p].update(entry)
        self._groups[:] = plan["groups_state"]
        self._solves.update(plan["solves"])
        self._gen_before = None

    def _fail(self) -> None:
        """After an error in the step: undo the capture's generator draws."""
        self._restore_generator()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["param_groups"] = st.groups_for_saving(sd["param_groups"])
        sd["curvlib"] = {
            "step": self._step,
            "generator": st.generator_state(self._generator),
            "groups": [dict(g) for g in self._groups],
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlib", None)
        groups = [dict(g) for g in state_dict["param_groups"]]
        st.restore_callables(groups, self.param_groups)
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        if extra is not None:
            self._step = int(extra["step"])
            self._generator.set_state(extra["generator"].to(torch.uint8).cpu())
            self._groups = [dict(g) for g in extra["groups"]]
        self._solves = {}
        self._captured = None


def _inner(ext):
    """The extension a :class:`SubBatch` wraps (or ``ext`` itself)."""
    return ext.inner if isinstance(ext, SubBatch) else ext


def _same_structure(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape for x, y in zip(la, lb))


class Preconditioner(CurvatureOptimizer):
    r"""The preconditioning core on its own: ``step()`` replaces each ``p.grad`` by the
    preconditioned direction ``(C_p + λ I)^-1 p.grad``, to compose with any ``torch.optim``
    optimizer (SGD, Adam), as kfac-pytorch and the KPSVD-paper code are used::

        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pre = Preconditioner(model.parameters(), curvature="kfac", optimizer=sgd, kl_clip=1e-3)
        with pre.capture():
            loss.backward()
        pre.step()      # p.grad <- direction
        sgd.step()

    Args:
        params: parameters or param groups (each group may override the keyword arguments).
        optimizer: the optimizer that applies the directions; ``kl_clip`` reads each parameter's
            ``lr`` from it at every step (so a scheduler can never leave the two out of sync).
        seed: seed of the optimizer's ``torch.Generator`` for MC targets (saved in the state).
        process_group, check_sync: data-parallel training (:class:`NaturalGradient`,
            :mod:`curvlib.optim.distributed`).
        **hyper: see :data:`CORE_DEFAULTS` and the README (curvature, fisher_type, mc_samples,
            kfac_approx, rank, damping, damping_mode, T_cov, T_inv, ema_decay, kl_clip,
            coarse_space, krylov, coarse_damping).
    """

    def __init__(
        self, params, optimizer: Optional[Optimizer] = None, seed: Optional[int] = None, *,
        process_group: Any = AUTO, check_sync: bool = False, **hyper: Any,
    ):
        unknown = set(hyper) - set(CORE_DEFAULTS)
        if unknown:
            raise TypeError(f"curvlib.optim.Preconditioner: unknown arguments {sorted(unknown)}.")
        defaults = dict(CORE_DEFAULTS, **hyper)
        self.optimizer = optimizer
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)
        if optimizer is None and any(g["kl_clip"] is not None for g in self.param_groups):
            raise ValueError(
                "curvlib.optim.Preconditioner: kl_clip needs the learning rate; pass the optimizer that "
                "applies the directions: Preconditioner(params, optimizer=sgd, kl_clip=...)."
            )

    def _lr_for(self, group, p) -> float:
        for g in self.optimizer.param_groups:
            if any(q is p for q in g["params"]):
                return float(g["lr"])
        raise ValueError(
            "curvlib.optim.Preconditioner: a parameter with kl_clip is not in the wrapped optimizer; "
            "build both over the same parameters."
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Replace every ``p.grad`` by its preconditioned (and clipped) direction."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            plan = self._directions()
        except BaseException:
            self._fail()
            raise
        for grp in plan["groups"]:
            for p, d in zip(grp["params"], grp["dirs"]):
                p.grad.copy_(d)
        self._commit_state(plan)
        self._step += 1
        return loss


__all__ = ["CurvatureOptimizer", "Preconditioner", "CORE_DEFAULTS"]
