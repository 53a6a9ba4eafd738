"""Natural-gradient optimizers composing curvlib's extensions and solvers.

- :class:`NaturalGradient`: a ``torch.optim.Optimizer`` stepping along ``(C + λ I)^-1 g``.
- :class:`CGNewton`: Newton-CG on GGN / Hessian / positive-curvature-Hessian products.
- :class:`NoisyNaturalGradient`: noisy K-FAC / VOGN, a Gaussian posterior with the curvature as precision.
- :class:`Preconditioner`: the same core; ``step()`` replaces ``p.grad`` by the direction, to
  compose with any ``torch.optim`` optimizer.

Curvatures (``curvature=``): see :mod:`curvlib.optim.curvatures`. Every hyper-parameter, with
its meaning: ``help(NaturalGradient)``, or :func:`curvlib.optim.hyperparams.markdown_table`.

Modules: :mod:`~curvlib.optim.core` (the step template shared by all optimizers: generator,
capture, plan / check / commit, checkpoints), :mod:`~curvlib.optim.running` (the running
curvature and its damped inverse), :mod:`~curvlib.optim.curvatures` (one strategy class per
curvature), :mod:`~curvlib.optim.hyperparams` (the hyper-parameter tables),
:mod:`~curvlib.optim.state` (what an optimizer keeps), :mod:`~curvlib.optim.eigenbasis`
(``"ekfac"``, ``"eigen-adam"``: steps in KFAC's eigenbasis), :mod:`~curvlib.optim.grafting`
(``graft=``), :mod:`~curvlib.optim.damping`,
:mod:`~curvlib.optim.distributed`; one module per optimizer.
"""
from curvlib.optim.cg_newton import CG_DEFAULTS, CGNewton
from curvlib.optim.curvatures import CURVATURES
from curvlib.optim.natural_gradient import STEP_DEFAULTS, NaturalGradient
from curvlib.optim.noisy import NoisyNaturalGradient
from curvlib.optim.preconditioner import CORE_DEFAULTS, Preconditioner

__all__ = ["CGNewton", "CG_DEFAULTS", "NaturalGradient", "NoisyNaturalGradient", "Preconditioner", "CURVATURES", "CORE_DEFAULTS", "STEP_DEFAULTS"]
