r"""``NaturalGradient``: a ``torch.optim.Optimizer`` that steps along preconditioned directions.

Per parameter, with ``g = p.grad (+ wd p for weight_decay_mode="l2")`` and ``d`` the
(KL-clipped) direction of :mod:`curvlib.optim.running`:

- ``momentum_type="heavy-ball"``: ``b <- momentum b + d`` (``b = d`` at the first step),
  ``p <- p - lr b`` (``torch.optim.SGD``'s convention, no dampening);
- ``momentum_type="adam"``: ``m <- β1 m + (1-β1) d``, ``v <- β2 v + (1-β2) d²`` with
  ``β1 = momentum``, ``β2 = beta2``, ``p <- p - lr m̂ / (sqrt(v̂) + eps)`` (bias-corrected moments of
  the preconditioned direction, Kingma & Ba 2015);
- ``weight_decay_mode="decoupled"``: ``p <- p (1 - lr wd)`` before the update
  (Loshchilov & Hutter 2019) instead of adding ``wd p`` to the gradient.

With ``adaptive_damping=True``, ``step(closure)`` adapts the group's ``damping`` by
Levenberg–Marquardt every ``damping_interval`` steps (:mod:`curvlib.optim.damping`); ``closure``
returns the loss on the current batch (called with autograd enabled, as ``torch.optim`` does, before
the update on every step that gets one and after the update on those steps; it need not call
``backward``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, List, Mapping, Optional

import torch
from torch import Tensor

from curvlib.optim.core import LR, StepPlan
from curvlib.optim.damping import adapt_groups, lm_groups
from curvlib.optim.hyperparams import HyperParameter, Rule, check_value, defaults_of, document, number, one_of
from curvlib.optim.running import CORE_DEFAULTS, CORE_HYPERPARAMETERS, RunningCurvatureOptimizer
from curvlib.optim.tensors import working_dtype


def _lm(group: Mapping[str, Any]) -> bool:
    return bool(group["adaptive_damping"])


def _adam(group: Mapping[str, Any]) -> bool:
    return group["momentum_type"] == "adam"


def _is_scalar(loss: Any) -> bool:
    """A number or a one-element tensor (what Levenberg–Marquardt reads as the loss)."""
    if isinstance(loss, Tensor):
        return loss.numel() == 1
    return isinstance(loss, numbers.Real) and not isinstance(loss, bool)


def _detached(loss: Any) -> Any:
    """A closure's loss without its graph (reading it as a number then warns nothing)."""
    return loss.detach() if isinstance(loss, Tensor) else loss


#: the hyper-parameters of NaturalGradient beyond the core (:data:`CORE_HYPERPARAMETERS`)
STEP_HYPERPARAMETERS = (
    HyperParameter(
        "momentum", "float", 0.0,
        "heavy-ball factor on the clipped direction (`b <- μ b + d`, `p <- p - lr b`), or `β1` for Adam",
        number(0, 1, high_open=True),
    ),
    HyperParameter("momentum_type", "str", "heavy-ball",
                   "or `\"adam\"`: bias-corrected first / second moments of the preconditioned direction",
                   one_of("heavy-ball", "adam")),
    HyperParameter("beta2", "float", 0.999, "Adam-style momentum: second-moment decay",
                   number(0, 1, high_open=True), when=_adam),
    HyperParameter("eps", "float", 1e-8, "Adam-style momentum: added to `sqrt(v̂)`",
                   number(0, low_open=True, finite=True), when=_adam),
    HyperParameter("weight_decay", "float", 0.0,
                   "`\"l2\"`: `wd p` added to the gradient before preconditioning (as `torch.optim.SGD`)",
                   number(0, finite=True)),
    HyperParameter("weight_decay_mode", "str", "l2", "or `\"decoupled\"`: `p <- p (1 - lr wd)` before the update",
                   one_of("l2", "decoupled")),
    HyperParameter(
        "adaptive_damping", "bool", False, "Levenberg–Marquardt (Martens & Grosse §6.5), needs `step(closure)`",
        Rule(lambda v, g: isinstance(v, bool) and (not v or g["curvature"] is not None), "True needs a curvature",
             "adaptive_damping={value!r} must be False or True, and True needs a curvature (not curvature=None)."),
    ),
    HyperParameter("damping_interval", "int", 5, "LM: adapt every this many steps", number(1, integer=True), when=_lm),
    HyperParameter("damping_decay", "float", (19.0 / 20.0) ** 5,
                   "LM: `λ <- ω λ` if `ρ > 3/4`, `λ <- λ / ω` if `ρ < 1/4`",
                   number(0, 1, low_open=True, high_open=True), when=_lm, default_text="(19/20)^5"),
    HyperParameter("min_damping", "float", 1e-8, "LM: lower clamp of the damping", number(0, finite=True), when=_lm),
    HyperParameter(
        "max_damping", "float", 1e4, "LM: upper clamp of the damping",
        Rule(lambda v, g: math.isfinite(v) and v >= g["min_damping"], "a finite number >= min_damping",
             "{name}={value!r} must be a finite number >= min_damping."), when=_lm,
    ),
)

#: the Levenberg–Marquardt rows (shared with CGNewton)
LM_HYPERPARAMETERS = tuple(hp for hp in STEP_HYPERPARAMETERS if hp.name in (
    "adaptive_damping", "damping_interval", "damping_decay", "min_damping", "max_damping"))

#: hyper-parameters of NaturalGradient beyond the core, with their defaults
STEP_DEFAULTS = defaults_of(STEP_HYPERPARAMETERS)


@document
class NaturalGradient(RunningCurvatureOptimizer):
    r"""Natural-gradient descent with a chosen curvature per param group (module docstring).

    Example::

        model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
        opt = NaturalGradient(model.parameters(), lr=1e-2, curvature="kfac", damping=1e-3)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with opt.capture():
                loss.backward()
            opt.step()

    ``params``: parameters, named parameters, or param groups (dicts may override every
    hyper-parameter below; ``curvature=None`` for a plain momentum-SGD group). Data-parallel
    training: :mod:`curvlib.optim.distributed` (give every rank the same ``seed``).
    """

    hyperparameters = (LR,) + CORE_HYPERPARAMETERS + STEP_HYPERPARAMETERS

    def __init__(
        self, params, lr: float, seed: Optional[int] = None, *, process_group: Any = "auto",
        check_sync: bool = False, **hyper: Any,
    ):
        check_value(LR, lr, self._where)
        allowed = set(CORE_DEFAULTS) | set(STEP_DEFAULTS)
        unknown = set(hyper) - allowed
        if unknown:
            raise TypeError(
                f"{self._where}: unknown arguments {sorted(unknown)}; the hyper-parameters are {sorted(allowed)}."
            )
        defaults = dict(CORE_DEFAULTS, **STEP_DEFAULTS, lr=lr)
        defaults.update(hyper)
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)

    def _grad(self, group: Mapping[str, Any], p: Tensor) -> Tensor:
        wd = group["weight_decay"]
        if wd and group["weight_decay_mode"] == "l2":
            return p.grad.add(p.detach(), alpha=wd)
        return p.grad

    def _lm_groups(self, k: int) -> List[int]:
        """The groups that adapt their damping at step ``k``."""
        return lm_groups(self.param_groups, k)

    def _evaluate(self, closure: Optional[Callable[[], Any]]) -> Any:
        """The loss before the update. ``closure`` runs with autograd enabled (torch's
        convention, as in :class:`Preconditioner` and :class:`CGNewton`): a torch closure that
        zeroes the gradients and calls ``backward`` (inside ``opt.capture()`` on curvature steps)
        works, and so does one that only returns the loss (Levenberg–Marquardt needs no backward).
        It is required on Levenberg–Marquardt steps and must then return the loss; both are
        checked before anything moves."""
        lm = self._lm_groups(self.core.step)
        if closure is None:
            if lm:
                raise RuntimeError(
                    f"{self._where}: adaptive_damping needs the loss before and after the update on this step; "
                    "call opt.step(closure) with closure = lambda: loss_fn(model(x), y)."
                )
            return None
        loss = super()._evaluate(closure)
        if lm and not _is_scalar(loss):
            raise TypeError(
                f"{self._where}: adaptive_damping (param groups {lm}) needs closure() to return the loss (a number "
                f"or a one-element tensor), it returned {type(loss).__name__}; the step was not taken and "
                "parameters and optimizer state are unchanged."
            )
        if self.core.distributed is not None:  # the concatenated batch's loss, the same on every rank
            loss = self.core.distributed.mean_scalar(_detached(loss))
        if loss is not None and not math.isfinite(float(_detached(loss))):
            raise FloatingPointError(
                f"{self._where}: the loss (closure) is NaN or Inf; the step was not taken and parameters and "
                "optimizer state are unchanged. Skip this batch."
            )
        return loss

    def _apply(self, plan: StepPlan) -> None:
        """Momentum / Adam state and parameters, in place; keeps the updates of the parameters of
        Levenberg–Marquardt groups in ``plan.deltas``."""
        keep = {id(p) for gi in self._lm_groups(plan.step) for p in plan.groups[gi].params}
        for group, gp in zip(self.param_groups, plan.groups):
            lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for p, d in zip(gp.params, gp.dirs):
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
                old = p.detach().clone() if id(p) in keep else None
                if wd and group["weight_decay_mode"] == "decoupled":
                    p.mul_(1 - lr * wd)
                p.add_(upd, alpha=-lr)
                if old is not None:
                    plan.deltas[id(p)] = p.detach() - old

    def _after_commit(self, plan: StepPlan, closure: Optional[Callable[[], Any]]) -> None:
        """Levenberg–Marquardt: ``rho = (h1 - h0) / M(Δ)`` (Martens & Grosse §6.5)."""
        if not self._lm_groups(plan.step):
            return
        # with autograd on, as before the update (_evaluate); a torch closure's opt.capture() is a
        # no-op here, so that the loss after the update draws no MC targets
        self.core.evaluating = True
        try:
            with torch.enable_grad():
                h1 = closure()
        finally:
            self.core.evaluating = False
        h0, h1 = float(_detached(plan.loss)), float(_detached(h1))
        if self.core.distributed is not None:
            h1 = self.core.distributed.mean_scalar(h1)

        def curv_deltas(gi, params, deltas):
            kind = self._kind(self.param_groups[gi])
            by_id = {id(p): d for p, d in zip(params, deltas)}
            cparams = [p for p in params if "running" in self.state[p]]
            cd_map = {}
            if cparams:
                deltas_c = [by_id[id(p)].to(working_dtype(p.dtype)) for p in cparams]  # float16: float32 curvature
                cds = kind.mvp(cparams, [self.state[p]["running"] for p in cparams], deltas_c)
                cd_map = {id(p): c.to(p.dtype) for p, c in zip(cparams, cds)}
            return [cd_map.get(id(p), torch.zeros_like(d)) for p, d in zip(params, deltas)]

        adapt_groups(self, plan, h0, h1, curv_deltas)


__all__ = ["NaturalGradient", "STEP_DEFAULTS", "STEP_HYPERPARAMETERS", "LM_HYPERPARAMETERS"]
