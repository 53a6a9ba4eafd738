r"""``Preconditioner``: the preconditioning core on its own, in front of any ``torch.optim`` optimizer."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor
from torch.optim import Optimizer

from curvlib.optim.core import CHECK_SYNC, PROCESS_GROUP, SEED, StepPlan
from curvlib.optim.distributed import AUTO
from curvlib.optim.hyperparams import HyperParameter, defaults_of, document, replace_entries
from curvlib.optim.running import CORE_DEFAULTS, CORE_HYPERPARAMETERS, RunningCurvatureOptimizer

#: the core's table with ``kl_clip`` off by default: the clip needs the learning rate, which only
#: the wrapped ``optimizer`` knows
PRECONDITIONER_HYPERPARAMETERS = replace_entries(CORE_HYPERPARAMETERS, kl_clip=dict(
    default=None,
    meaning="scale the group's direction by `min(1, sqrt(kl_clip / (lr^2 sum_p <d_p, g_p>)))`, `lr` read from "
            "`optimizer` (default `None`: no clipping; `1e-3` is NaturalGradient's default and recommended)",
))
#: the defaults of :class:`Preconditioner`'s param groups
PRECONDITIONER_DEFAULTS = defaults_of(PRECONDITIONER_HYPERPARAMETERS)

OPTIMIZER = HyperParameter(
    "optimizer", "torch.optim.Optimizer or None", None,
    "the optimizer that applies the directions; `kl_clip` reads each parameter's `lr` from it at every step",
)


@document
class Preconditioner(RunningCurvatureOptimizer):
    r"""The preconditioning core on its own: ``step()`` replaces each ``p.grad`` by the
    preconditioned direction ``(C_p + λ I)^-1 p.grad``, to compose with any ``torch.optim``
    optimizer (SGD, Adam), as kfac-pytorch and the KPSVD-paper code are used::

        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pre = Preconditioner(model.parameters(), curvature="kfac", optimizer=sgd, kl_clip=1e-3)
        with pre.capture():
            loss.backward()
        pre.step()      # p.grad <- direction
        sgd.step()

    The running curvature, its inverse and the schedule: :mod:`curvlib.optim.running`.
    """

    hyperparameters = PRECONDITIONER_HYPERPARAMETERS
    arguments = (OPTIMIZER, SEED, PROCESS_GROUP, CHECK_SYNC)

    def __init__(
        self, params, optimizer: Optional[Optimizer] = None, seed: Optional[int] = None, *,
        process_group: Any = AUTO, check_sync: bool = False, **hyper: Any,
    ):
        unknown = set(hyper) - set(PRECONDITIONER_DEFAULTS)
        if unknown:
            raise TypeError(f"curvlib.optim.Preconditioner: unknown arguments {sorted(unknown)}.")
        defaults = dict(PRECONDITIONER_DEFAULTS, **hyper)
        self.optimizer = optimizer
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)

    def check_group(self, group: Mapping[str, Any], gi: int) -> None:
        super().check_group(group, gi)
        if self.optimizer is None and group["kl_clip"] is not None:
            raise ValueError(
                f"curvlib.optim.Preconditioner: param group {gi}: kl_clip needs the learning rate; pass the "
                "optimizer that applies the directions: Preconditioner(params, optimizer=sgd, kl_clip=...)."
            )

    def _lr_for(self, group: Mapping[str, Any], p: Tensor) -> float:
        for g in self.optimizer.param_groups:
            if any(q is p for q in g["params"]):
                return float(g["lr"])
        raise ValueError(
            "curvlib.optim.Preconditioner: a parameter with kl_clip is not in the wrapped optimizer; "
            "build both over the same parameters."
        )

    def _apply(self, plan: StepPlan) -> None:
        """Replace every ``p.grad`` by its preconditioned (and clipped) direction."""
        for gp in plan.groups:
            for p, d in zip(gp.params, gp.dirs):
                p.grad.copy_(d)


__all__ = ["Preconditioner", "CORE_DEFAULTS", "PRECONDITIONER_DEFAULTS", "PRECONDITIONER_HYPERPARAMETERS"]
