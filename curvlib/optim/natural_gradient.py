r"""``NaturalGradient``: a ``torch.optim.Optimizer`` that steps along preconditioned directions.

Per parameter, with ``g = p.grad (+ wd p for weight_decay_mode="l2")`` and ``d`` the
(KL-clipped) direction of :mod:`curvlib.optim.preconditioner`:

- ``momentum_type="heavy-ball"``: ``b <- momentum b + d`` (``b = d`` at the first step),
  ``p <- p - lr b`` (``torch.optim.SGD``'s convention, no dampening);
- ``momentum_type="adam"``: ``m <- β1 m + (1-β1) d``, ``v <- β2 v + (1-β2) d²`` with
  ``β1 = momentum``, ``β2 = beta2``, ``p <- p - lr m̂ / (sqrt(v̂) + eps)`` (bias-corrected moments of
  the preconditioned direction, Kingma & Ba 2015);
- ``weight_decay_mode="decoupled"``: ``p <- p (1 - lr wd)`` before the update
  (Loshchilov & Hutter 2019) instead of adding ``wd p`` to the gradient.

With ``adaptive_damping=True``, ``step(closure)`` adapts the group's ``damping`` by
Levenberg–Marquardt every ``damping_interval`` steps (:mod:`curvlib.optim.damping`); ``closure``
returns the loss on the current batch (it is called under ``torch.no_grad()``, before and after
the update, only on those steps).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from curvlib.optim.curvatures import curvature_for
from curvlib.optim.damping import levenberg_marquardt, quadratic_model
from curvlib.optim.preconditioner import CORE_DEFAULTS, CurvatureOptimizer

#: hyper-parameters of NaturalGradient beyond the core, with their defaults
STEP_DEFAULTS: Dict[str, Any] = dict(
    momentum=0.0,
    momentum_type="heavy-ball",
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    weight_decay_mode="l2",
    adaptive_damping=False,
    damping_interval=5,
    damping_decay=(19.0 / 20.0) ** 5,
    min_damping=1e-8,
    max_damping=1e4,
)


class NaturalGradient(CurvatureOptimizer):
    r"""Natural-gradient descent with a chosen curvature per param group.

    Example::

        model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
        opt = NaturalGradient(model.parameters(), lr=1e-2, curvature="kfac", damping=1e-3)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with opt.capture():
                loss.backward()
            opt.step()

    Args:
        params: parameters, named parameters, or param groups (dicts may override every
            keyword argument below, ``curvature=None`` for a plain momentum-SGD group).
        lr: learning rate.
        seed: seed of the optimizer's ``torch.Generator`` (MC targets); ``None``: drawn once from
            the global RNG. The generator's state is part of ``state_dict()``. Data-parallel: give
            every rank the same seed (the state must be identical on all ranks).
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is initialized),
            a ``ProcessGroup``, or ``None`` (single process); data-parallel training is described
            in :mod:`curvlib.optim.distributed`.
        check_sync: data-parallel: compare a parameter checksum across ranks at every step and
            raise if they drifted apart (one more number in an all-reduce that runs anyway).
        **hyper: :data:`~curvlib.optim.preconditioner.CORE_DEFAULTS` and :data:`STEP_DEFAULTS`.
    """

    def __init__(
        self, params, lr: float, seed: Optional[int] = None, *, process_group: Any = "auto",
        check_sync: bool = False, **hyper: Any,
    ):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"curvlib.optim.NaturalGradient: lr={lr!r} must be a number >= 0.")
        allowed = set(CORE_DEFAULTS) | set(STEP_DEFAULTS)
        unknown = set(hyper) - allowed
        if unknown:
            raise TypeError(
                f"curvlib.optim.NaturalGradient: unknown arguments {sorted(unknown)}; the hyper-parameters "
                f"are {sorted(allowed)}."
            )
        defaults = dict(CORE_DEFAULTS, **STEP_DEFAULTS, lr=lr)
        defaults.update(hyper)
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)

    def _validate(self, g: Dict[str, Any], gi: int) -> None:
        super()._validate(g, gi)
        where = f"curvlib.optim.NaturalGradient: param group {gi}"
        if g["momentum_type"] not in ("heavy-ball", "adam"):
            raise ValueError(f"{where}: momentum_type={g['momentum_type']!r}; use 'heavy-ball' or 'adam'.")
        if not 0.0 <= g["momentum"] < (1.0 if g["momentum_type"] == "adam" else math.inf):
            raise ValueError(f"{where}: momentum={g['momentum']!r} must be >= 0 (< 1 for 'adam').")
        if g["weight_decay_mode"] not in ("l2", "decoupled"):
            raise ValueError(f"{where}: weight_decay_mode={g['weight_decay_mode']!r}; use 'l2' or 'decoupled'.")
        if g["weight_decay"] < 0:
            raise ValueError(f"{where}: weight_decay={g['weight_decay']!r} must be >= 0.")
        if g["adaptive_damping"]:
            if not 0 < g["damping_decay"] < 1:
                raise ValueError(f"{where}: damping_decay={g['damping_decay']!r} must be in (0, 1).")
            if not (isinstance(g["damping_interval"], int) and g["damping_interval"] >= 1):
                raise ValueError(f"{where}: damping_interval={g['damping_interval']!r} must be an int >= 1.")
            if curvature_for(g["curvature"]) is None:
                raise ValueError(f"{where}: adaptive_damping needs a curvature (the group has curvature=None).")

    def _grad(self, group: Dict[str, Any], p: Tensor) -> Tensor:
        wd = group["weight_decay"]
        if wd and group["weight_decay_mode"] == "l2":
            return p.grad.add(p.detach(), alpha=wd)
        return p.grad

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One update; ``closure`` (returning the loss, no backward needed) is required on
        Levenberg–Marquardt steps (``adaptive_damping=True``) and otherwise only evaluated."""
        k = self._step
        lm_groups = [
            gi for gi, g in enumerate(self.param_groups)
            if g["adaptive_damping"] and k % g["damping_interval"] == 0
        ]
        if lm_groups and closure is None:
            raise RuntimeError(
                "curvlib.optim.NaturalGradient: adaptive_damping needs the loss before and after the "
                "update on this step; call opt.step(closure) with closure = lambda: loss_fn(model(x), y)."
            )
        try:
            loss_before = None
            if closure is not None:
                loss_before = closure()
                if self._dp is not None:  # the concatenated batch's loss, the same on every rank
                    loss_before = self._dp.mean_scalar(loss_before)
                if loss_before is not None and not math.isfinite(float(loss_before)):
                    raise FloatingPointError(
                        "curvlib.optim: the loss (closure) is NaN or Inf; the step was not taken and "
                        "parameters and optimizer state are unchanged. Skip this batch."
                    )
            plan = self._directions()
        except BaseException:
            self._fail()
            raise
        # ---- commit: every quantity is finite; the in-place updates below do not raise
        lm_ids = {id(p) for gi in lm_groups for p in plan["groups"][gi]["params"]}
        deltas = self._apply(plan, lm_ids)
        self._commit_state(plan)
        self._step += 1
        if lm_groups:
            loss_after = float(closure())
            if self._dp is not None:
                loss_after = self._dp.mean_scalar(loss_after)
            for gi in lm_groups:
                self._adapt_damping(gi, plan, deltas, float(loss_before), loss_after)
        return loss_before

    def _apply(self, plan: Dict[str, Any], keep_delta: set) -> Dict[int, Tensor]:
        """Momentum / Adam state and parameters, in place; returns the updates of the
        parameters in ``keep_delta`` (ids), for Levenberg–Marquardt."""
        deltas: Dict[int, Tensor] = {}
        for group, grp in zip(self.param_groups, plan["groups"]):
            lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for p, d in zip(grp["params"], grp["dirs"]):
                s = self.state[p]
                if group["momentum_type"] == "adam":
                    b2 = float(group["beta2"])
                    t = int(s.get("adam_step", 0)) + 1
                    if "exp_avg" not in s:
                        s["exp_avg"], s["exp_avg_sq"] = torch.zeros_like(d), torch.zeros_like(d)
                    m, v = s["exp_avg"], s["exp_avg_sq"]
                    m.mul_(mu).add_(d, alpha=1 - mu)
                    v.mul_(b2).addcmul_(d, d, value=1 - b2)
                    s["adam_step"] = t
                    upd = (m / (1 - mu**t)).div_((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
                elif mu:
                    if "momentum_buffer" not in s:
                        s["momentum_buffer"] = d.clone()
                    else:
                        s["momentum_buffer"].mul_(mu).add_(d)
                    upd = s["momentum_buffer"]
                else:
                    upd = d
                old = p.detach().clone() if id(p) in keep_delta else None
                if wd and group["weight_decay_mode"] == "decoupled":
                    p.mul_(1 - lr * wd)
                p.add_(upd, alpha=-lr)
                if old is not None:
                    deltas[id(p)] = p.detach() - old
        return deltas

    def _adapt_damping(self, gi: int, plan, deltas, h0: float, h1: float) -> None:
        """Levenberg–Marquardt: ``rho = (h1 - h0) / M(Δ)`` (Martens & Grosse §6.5)."""
        group = self.param_groups[gi]
        curv = curvature_for(group["curvature"])
        grp = plan["groups"][gi]
        params, grads = grp["params"], grp["grads"]
        deltas = [deltas[id(p)] for p in params]
        by_id = {id(p): d for p, d in zip(params, deltas)}
        cparams = [p for p in params if "curvature" in self.state[p]]
        cd_map = {}
        if cparams:
            cds = curv.mvp(cparams, [self.state[p]["curvature"] for p in cparams], [by_id[id(p)] for p in cparams])
            cd_map = {id(p): c for p, c in zip(cparams, cds)}
        curv_deltas = [cd_map.get(id(p), torch.zeros_like(d)) for p, d in zip(params, deltas)]
        model = quadratic_model(grads, deltas, curv_deltas, float(group["damping"]))
        rho = (h1 - h0) / model if model < 0 else -math.inf
        group["damping"] = levenberg_marquardt(
            float(group["damping"]), rho, float(group["damping_decay"]),
            float(group["min_damping"]), float(group["max_damping"]),
        )
        self._groups[gi]["last_rho"] = rho


__all__ = ["NaturalGradient", "STEP_DEFAULTS"]
