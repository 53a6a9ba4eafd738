r"""``CGNewton``: matrix-free Newton steps ``(C + λ I) d = g`` solved by conjugate gradients.

Per step and param group (docs/design.md §2), with ``g = p.grad``:

- ``block_diagonal=True``: one CG per parameter ``p`` on ``(C_pp + λ I) d_p = g_p``, ``C_pp`` the
  exact block of the chosen curvature, applied through its savefield (``p.ggnmp``, ``p.hmp``,
  ``p.pchmp``); each block has its own CG scalars, stopping rule and iteration count, and all
  blocks advance together in one loop (:func:`curvlib.solvers.cg_blocks`);
- ``block_diagonal=False``: one CG on the whole-network system ``(C + λ I) d = g`` over the
  group's parameters (all blocks and cross-parameter terms, ``ext.operator()``);
- ``p <- p - lr d_p``; a parameter without curvature (its layer has no adapter) moves by
  ``-lr g_p``.

Curvatures (:mod:`curvlib.optim.products`): ``"ggn"`` (GGN / Fisher of
``fisher_type``, :class:`~curvlib.extensions.GGNMP`; Schraudolph 2002, Martens 2010),
``"hessian"`` (:class:`~curvlib.extensions.HMP`), ``"pch-abs"`` / ``"pch-clip"``
(positive-curvature Hessian, :class:`~curvlib.extensions.PCHMP`; Chen et al. 2019, "BDA-PCH").
This is BackPACK's CG-Newton example (Dangel et al. 2020) as an optimizer.

On an indefinite system (Hessian), CG stops at the first direction of non-positive curvature
(:func:`curvlib.solvers.cg` with ``negative_curvature="stop"``): the direction is the CG iterate
reached so far, or ``g`` itself when it happens at the first iteration (truncated Newton,
Nocedal & Wright Alg. 7.1); ``state[p]["cg_negative_curvature"]`` says so.

Logging: after each step, ``opt.state[p]`` holds ``cg_iterations`` (iterations run),
``cg_residual`` (final ``||(C + λI) d - g||``, recursive), ``cg_converged`` and
``cg_negative_curvature`` of the system ``p`` took part in, and ``direction`` (``d_p``, the warm
start of the next step with ``warm_start=True``). ``opt.last_cg`` lists one dict per solve of
the last step.

Faults: a non-finite gradient, loss (closure), product or direction raises ``FloatingPointError``
before anything moves (as :class:`NaturalGradient`): skip the batch, lower ``lr`` or raise
``damping``. A Newton step trusts its quadratic model; where the model is poor (ReLU networks,
unscaled inputs, small damping) a fixed damping lets the loss grow by orders of magnitude without
any non-finite value. ``adaptive_damping=True`` (with ``step(closure)``, ``closure`` returning the
loss of the batch) adapts ``damping`` by Levenberg–Marquardt every ``damping_interval`` steps,
with the exact curvature product of the step in the quadratic model
``M(Δ) = g^T Δ + 1/2 Δ^T (C + λ I) Δ`` (:mod:`curvlib.optim.damping`, Martens 2010 §4.1).

Options: ``warm_start=True`` starts CG from the previous direction (Martens 2010, §4.5);
``precondition="kfac"`` preconditions CG with the damped KFAC inverse
``(kron(G, A) + λ I)^-1`` of the same batch (type-2 factors, :class:`~curvlib.solvers.KroneckerInverse`
with ``damping_mode="exact"``), block by block; it changes the CG path, not the solution.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from curvlib.extensions.base import FISHER_TYPES
from curvlib.optim.core import LR, CurvatureOptimizer, GroupPlan, StepPlan
from curvlib.optim.products import CG_CURVATURES, kfac_inverse, restricted
from curvlib.optim.hyperparams import HyperParameter, check_value, defaults_of, document, number, one_of
from curvlib.optim.damping import adapt_groups, lm_groups
from curvlib.optim.natural_gradient import LM_HYPERPARAMETERS
from curvlib.solvers import CGBlockError, cg, cg_blocks

#: the hyper-parameters of CGNewton (the defaults are BackPACK's CGNOptimizer's)
CG_HYPERPARAMETERS = (
    HyperParameter("curvature", "str", "ggn", "the curvature blocks (module docstring)", one_of(*CG_CURVATURES)),
    HyperParameter("fisher_type", "str", "type-2", "for `\"ggn\"`: `\"type-2\"` (exact GGN), `\"mc\"` or `\"empirical\"`",
                   one_of(*FISHER_TYPES)),
    HyperParameter("damping", "float", 1e-2, "`λ` added to the curvature", number(0, finite=True)),
    HyperParameter("maxiter", "int", 100, "CG iterations at most (per system)", number(1, integer=True)),
    HyperParameter("tol", "float", 1e-1, "CG stopping rule `||r|| <= max(tol ||g||, atol)`", number(0, finite=True)),
    HyperParameter("atol", "float", 1e-8, "CG absolute tolerance", number(0, finite=True)),
    HyperParameter("block_diagonal", "bool", True, "one CG per parameter (`True`) or one on the whole network",
                   one_of(True, False)),
    HyperParameter("warm_start", "bool", False, "start CG from the previous step's direction", one_of(True, False)),
    HyperParameter("precondition", "str or None", None, "`\"kfac\"`: precondition CG with the damped KFAC inverse",
                   one_of(None, "kfac")),
    HyperParameter("pch_convention", "str", "paper",
                   "`\"paper\"` (Chen et al.) or `\"backpack\"` (BackPACK 1.7.1's PCHMP), see `curvlib.extensions.PCHMP`",
                   one_of("paper", "backpack")),
)

CG_HYPERPARAMETERS = CG_HYPERPARAMETERS + LM_HYPERPARAMETERS

#: hyper-parameters of CGNewton and their defaults (BackPACK's CGNOptimizer's defaults)
CG_DEFAULTS: Dict[str, Any] = defaults_of(CG_HYPERPARAMETERS)


@document
class CGNewton(CurvatureOptimizer):
    r"""Newton-CG with GGN, Hessian or positive-curvature-Hessian products (module docstring).

    Example::

        model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
        opt = CGNewton(model.parameters(), lr=0.1, curvature="ggn", damping=1e-2, maxiter=20,
                       tol=0.1, atol=1e-6)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with opt.capture():   # every step needs one
                loss.backward()
            opt.step()
    """

    hyperparameters = (LR,) + CG_HYPERPARAMETERS
    kinds = CG_CURVATURES
    direction_name = "Newton direction"

    def __init__(
        self, params, lr: float, seed: Optional[int] = None, *, process_group: Any = "auto",
        check_sync: bool = False, **hyper: Any,
    ):
        check_value(LR, lr, self._where)
        unknown = set(hyper) - set(CG_DEFAULTS)
        if unknown:
            raise TypeError(
                f"{self._where}: unknown arguments {sorted(unknown)}; the hyper-parameters are {sorted(CG_DEFAULTS)}."
            )
        defaults = dict(CG_DEFAULTS, lr=lr)
        defaults.update(hyper)
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)

    @property
    def last_cg(self) -> List[Dict[str, Any]]:
        """One dict per CG solve of the last step (``opt.core.last_cg``)."""
        return self.core.last_cg

    def _evaluate(self, closure: Optional[Callable[[], Any]]) -> Any:
        """The loss before the update (required on Levenberg–Marquardt steps); a non-finite one
        raises before anything moves."""
        if closure is None:
            if lm_groups(self.param_groups, self.core.step):
                raise RuntimeError(
                    f"{self._where}: adaptive_damping needs the loss before and after the update on this step; "
                    "call opt.step(closure) with closure = lambda: loss_fn(model(x), y)."
                )
            return None
        loss = super()._evaluate(closure)
        value = None if loss is None else float(loss)
        if self.core.distributed is not None:
            value = self.core.distributed.mean_scalar(value)
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(
                f"{self._where}: the loss (closure) is NaN or Inf; the step was not taken and parameters and "
                "optimizer state are unchanged. Skip this batch, lower the learning rate, increase damping or "
                "use adaptive_damping=True."
            )
        return loss if self.core.distributed is None else value

    def _after_commit(self, plan: StepPlan, closure: Optional[Callable[[], Any]]) -> None:
        """Levenberg–Marquardt with the step's exact products ``C d`` (``plan.curv_dirs``)."""
        if not lm_groups(self.param_groups, plan.step):
            return
        h1 = float(closure())
        if self.core.distributed is not None:
            h1 = self.core.distributed.mean_scalar(h1)

        def curv_deltas(gi, params, deltas):
            lr = float(self.param_groups[gi]["lr"])
            return [plan.curv_dirs[id(p)].to(d.dtype) * -lr if id(p) in plan.curv_dirs else torch.zeros_like(d)
                    for p, d in zip(params, deltas)]

        adapt_groups(self, plan, float(plan.loss), h1, curv_deltas)

    def _averaged(self, A: Callable) -> Callable:
        dp = self.core.distributed
        return A if dp is None else dp.averaged(A)

    def _plan_group(self, plan: StepPlan, gp: GroupPlan, group: Mapping[str, Any]) -> None:
        """One Newton-CG direction per parameter (new values in ``gp.values``)."""
        record = self._require_capture(gp.index)
        kind = self._kind(group)
        product = next(e for e in record.extensions if e.savefield == kind.savefield)
        kfac, lam = group["precondition"] == "kfac", float(group["damping"])
        dirs: Dict[Tensor, Tensor] = {}
        if group["block_diagonal"]:
            systems = []  # one CG system per parameter with curvature, solved in one loop
            for p, g, n in zip(gp.params, gp.grads, gp.names):
                prod = p.__dict__.get(kind.savefield)
                if prod is None:
                    self._warn_plain(n, kind.name, p)
                    continue
                A = self._averaged(lambda v, prod=prod: prod(v.unsqueeze(0)).squeeze(0))  # damped by cg_blocks
                systems.append((p, g, n, A, kfac_inverse(p, lam) if kfac else None))
            lm = gp.index in lm_groups(self.param_groups, plan.step)
            for (p, g, n, A, _), (d, info) in zip(systems, self._solve_blocks(systems, group)):
                dirs[p] = d
                plan.log.append(_entry(gp.index, [n], info))
                plan.state[p] = _cg_state(info, d)
                if lm:  # the undamped product C d of the quadratic model (one more product)
                    plan.curv_dirs[id(p)] = A(d)
        else:
            op = product.operator()
            inside = [p for p in gp.params if any(p is q for q in op.params)]
            for p, n in zip(gp.params, gp.names):
                if not any(p is q for q in inside):
                    self._warn_plain(n, kind.name, p)
            if inside:
                C = self._averaged(restricted(op, inside))
                A = _damped(C, lam)
                Ms = [kfac_inverse(p, lam) for p in inside] if kfac else None
                M = (lambda vs: [m(v) for m, v in zip(Ms, vs)]) if kfac else None
                ds, info = self._solve(A, [p.grad for p in inside], inside, M, group, f"param group {gp.index}")
                names = [n for p, n in zip(gp.params, gp.names) if any(p is q for q in inside)]
                plan.log.append(_entry(gp.index, names, info))
                for p, d in zip(inside, ds):
                    dirs[p] = d
                    plan.state[p] = _cg_state(info, d)
                if gp.index in lm_groups(self.param_groups, plan.step):  # C d of the quadratic model
                    for p, cd in zip(inside, C(list(ds))):
                        plan.curv_dirs[id(p)] = cd
        gp.dirs = [dirs.get(p, g).to(p.dtype) for p, g in zip(gp.params, gp.grads)]
        gp.values = torch._foreach_add([p.detach() for p in gp.params], gp.dirs, alpha=-float(group["lr"]))

    def _warm(self, params: List[Tensor], group: Mapping[str, Any]) -> List[Optional[Tensor]]:
        """The previous directions (``warm_start``; ``None`` where there is none)."""
        prev = [self.state.get(p, {}).get("direction") for p in params]
        return [d if group["warm_start"] and d is not None and d.shape == p.shape else None for d, p in zip(prev, params)]

    def _solve_blocks(self, systems, group) -> List[Any]:
        """One CG per parameter block (:func:`~curvlib.solvers.cg_blocks`: every block keeps its own
        CG scalars and stopping rule, all blocks of one dtype and device advance in one loop).
        ``systems``: ``(p, g, name, A, M)``; returns ``(d, info)`` in that order."""
        out: List[Any] = [None] * len(systems)
        kinds: Dict[Any, List[int]] = {}
        for i, (_, g, _, _, _) in enumerate(systems):
            kinds.setdefault((g.dtype, g.device), []).append(i)
        for idx in kinds.values():
            x0 = self._warm([systems[i][0] for i in idx], group) if group["warm_start"] else None
            Ms = [systems[i][4] for i in idx]
            try:
                ds, infos = cg_blocks(
                    [systems[i][3] for i in idx], [systems[i][1] for i in idx], x0=x0, tol=float(group["tol"]),
                    atol=float(group["atol"]), maxiter=int(group["maxiter"]),
                    M=Ms if any(m is not None for m in Ms) else None, negative_curvature="stop",
                    shift=float(group["damping"]),
                )
            except CGBlockError as e:
                _raise_if_nonfinite(e, group, systems[idx[e.block]][2])
                raise
            for i, d, info in zip(idx, ds, infos):
                out[i] = (d, info)
        return out

    def _solve(self, A, b, params, M, group, where):
        prev = self._warm(params, group)
        x0 = prev if all(d is not None for d in prev) else None
        try:
            return cg(
                A, b, x0=x0, tol=float(group["tol"]), atol=float(group["atol"]), maxiter=int(group["maxiter"]),
                M=M, negative_curvature="stop",
            )
        except ValueError as e:
            _raise_if_nonfinite(e, group, where)
            raise

    def _apply(self, plan: StepPlan) -> None:
        keep = set(lm_groups(self.param_groups, plan.step))
        for gp in plan.groups:
            for p, v in zip(gp.params, gp.values or []):
                if gp.index in keep:
                    plan.deltas[id(p)] = v - p.detach()
                p.copy_(v)
        self.core.last_cg = plan.log
        for gi, schedule in enumerate(plan.schedule):
            schedule.last_cg = _totals([e for e in plan.log if e["group"] == gi])


def _totals(log: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A group's CG totals of one step (``opt.core.groups[i].last_cg``)."""
    return {
        "iterations": sum(e["iterations"] for e in log),
        "residual": max((e["residual"] for e in log), default=0.0),
        "negative_curvature": any(e["negative_curvature"] for e in log),
    }


def _raise_if_nonfinite(e: Exception, group: Mapping[str, Any], where: str) -> None:
    """A CG error caused by non-finite products (the solvers name NaN / Inf) as the optimizer's
    ``FloatingPointError``; other errors are left to the caller to re-raise."""
    if "NaN" in str(e) or "Inf" in str(e):
        raise FloatingPointError(
            f"curvlib.optim.CGNewton: the {group['curvature']!r} products of {where} are not finite "
            f"({e}); the step was not taken and state is unchanged. Skip this batch (opt.zero_grad()); if it "
            "recurs, lower the learning rate, increase damping or use adaptive_damping=True with step(closure)."
        ) from e


def _damped(A: Callable, lam: float) -> Callable:
    """``v -> A v + λ v`` on a list of tensors."""
    return lambda v: [o + lam * t for o, t in zip(A(v), v)]


def _entry(gi: int, names: List[str], info) -> Dict[str, Any]:
    return {
        "group": gi, "params": names, "iterations": int(info.iterations), "residual": float(info.residual_norm),
        "converged": bool(info.converged), "negative_curvature": bool(getattr(info, "negative_curvature", False)),
    }


def _cg_state(info, d) -> Dict[str, Any]:
    return {
        "cg_iterations": int(info.iterations), "cg_residual": float(info.residual_norm),
        "cg_converged": bool(info.converged), "cg_negative_curvature": bool(getattr(info, "negative_curvature", False)),
        "direction": d.detach().clone() if isinstance(d, Tensor) else d,
    }


__all__ = ["CGNewton", "CG_DEFAULTS", "CG_HYPERPARAMETERS", "CG_CURVATURES"]
