r"""``NoisyNaturalGradient``: variational inference with a Gaussian posterior whose precision is
the curvature (noisy K-FAC, Zhang et al. 2018, "Noisy natural gradient as variational
inference"; with ``curvature="diag"``: VOGN, Khan et al. 2018).

The posterior over the weights is ``N(μ, Σ)`` with ``μ`` the parameters and

    Σ = s² (C + λ I)^-1,     λ = kl_weight · prior_precision / dataset_size,   s² = kl_weight / dataset_size

``C`` the running curvature (EMA, of the mean loss over the batch: the optimizer's ``kfac`` or
``diag`` curvature). A step is the natural-gradient step of :class:`NaturalGradient` with
``damping = λ`` (``damping_mode="exact"``) and ``weight_decay = λ`` (the prior's gradient),
taken at the mean with the gradient evaluated at a weight sample::

    μ <- μ - lr (C + λ I)^-1 (∇ loss(w) + λ μ),     w ~ N(μ, Σ)

For a Gaussian likelihood written as ``loss = NLL / dataset_size`` (MSE: ``σ² = 1/2``) and the
exact curvature, the fixed point is the exact posterior: mean and covariance
``(dataset_size C + prior_precision I)^-1`` (kl_weight = 1; Bayesian linear regression).

Usage (the backward must run inside ``sample()``: the weights are restored on exit)::

    opt = NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=len(data), prior_precision=1.0)
    with opt.sample():
        loss = loss_fn(model(x), y)
        with opt.capture():
            loss.backward()
    opt.step()
    probs = opt.predict(lambda x: model(x).softmax(-1), x, samples=10)

``sample()`` draws from the optimizer's training generator (saved in the checkpoint; a failed
step restores it, so the batch can be skipped or retried with the same draws); ``step()`` inside
``sample()`` is refused (the means are restored on exit, which would discard the step).
``predict()`` and ``predictive()`` draw from their own generator (``opt.predict_generator``, or
the ``generator=`` argument), so validation during training does not change the training run.

**Regression.** The likelihood is the loss: ``nn.MSELoss()`` (mean) is the Gaussian NLL per datum
with noise variance ``σ² = 1/2``, up to a constant (``(y - f)² = (y - f)² / (2 σ²)``). For data
with noise standard deviation ``σ``, train on ``MSELoss()(f, y) / (2 σ²)``
(:meth:`NoisyNaturalGradient.gaussian_nll_scale` gives the factor ``1 / (2 σ²)``); otherwise the
posterior is that of ``σ² = 1/2``, far too wide when ``σ`` is small. The predictive mean and
spread of a regression model, ``σ`` included::

    mean, std = opt.predictive(model, x, samples=50, noise_std=sigma)

(``std² = Var_w[f_w(x)] + σ²``: the weights' spread plus the observation noise.)
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from curvlib.optim.core import CHECK_SYNC, PROCESS_GROUP, SEED
from curvlib.optim.hyperparams import REQUIRED, HyperParameter, Rule, check_value, document, number, replace_entries
from curvlib.optim.natural_gradient import NaturalGradient
from curvlib.optim.tensors import working_dtype

#: the hyper-parameters that the variational model fixes: (value, meaning) as the docs show them
_FIXED_AS = {
    "damping": ("λ", "fixed by the prior: `λ = kl_weight · prior_precision / dataset_size`"),
    "damping_mode": ('"exact"', "fixed: `C + λ I`"),
    "weight_decay": ("λ", "fixed: `λ μ`, the prior's gradient"),
    "weight_decay_mode": ('"l2"', "fixed: added to the gradient before preconditioning"),
    "adaptive_damping": ("False", "fixed: the damping is the prior's"),
}
_FIXED = tuple(_FIXED_AS)
#: defaults that differ from NaturalGradient's: the algorithms update the posterior precision (the
#: running curvature) at every step and take the unclipped natural-gradient step (Zhang et al. 2018,
#: Khan et al. 2018)
_ALGORITHM_DEFAULTS = dict(T_cov=1, T_inv=1, curvature_warmup=0, kl_clip=None)

DATASET_SIZE = HyperParameter(
    "dataset_size", "int", REQUIRED, "`N`, the number of training examples (the loss is a mean over a batch)",
    number(1, integer=True),
)
PRIOR_PRECISION = HyperParameter(
    "prior_precision", "float", REQUIRED, "precision `α` of the Gaussian prior `N(0, α^-1 I)`",
    number(0, low_open=True, finite=True),
)
KL_WEIGHT = HyperParameter("kl_weight", "float", 1.0, "weight of the KL term (1: the ELBO; < 1 tempers the posterior)",
                           number(0, low_open=True, finite=True))
CURVATURE = HyperParameter("curvature", "str", "kfac", "`\"kfac\"` (noisy K-FAC) or `\"diag\"` (VOGN)",
                           Rule(lambda v, g: v in ("kfac", "diag"), "\"kfac\" or \"diag\"",
                                "{name}={value!r}; use 'kfac' (noisy K-FAC) or 'diag' (VOGN)."))


@document
class NoisyNaturalGradient(NaturalGradient):
    """Noisy natural gradient / VOGN (module docstring): :class:`NaturalGradient` with damping and
    weight decay fixed by the prior, and :meth:`sample` / :meth:`predict` for the posterior."""

    hyperparameters = replace_entries(
        NaturalGradient.hyperparameters,
        curvature=dict(meaning=CURVATURE.meaning + " (the constructor's argument)"),
        **{name: dict(default=value) for name, value in _ALGORITHM_DEFAULTS.items()},
        **{name: dict(default_text=value, meaning=meaning) for name, (value, meaning) in _FIXED_AS.items()},
    )
    arguments = (DATASET_SIZE, PRIOR_PRECISION, KL_WEIGHT, SEED, PROCESS_GROUP, CHECK_SYNC)

    def __init__(
        self, params, lr: float, dataset_size: int, prior_precision: float, kl_weight: float = 1.0,
        mc_samples: int = 1, curvature: str = "kfac", seed: Optional[int] = None, **hyper: Any,
    ):
        where = self._where
        for hp, v in ((DATASET_SIZE, dataset_size), (PRIOR_PRECISION, prior_precision), (KL_WEIGHT, kl_weight),
                      (CURVATURE, curvature)):
            check_value(hp, v, where)
        fixed = sorted(set(hyper) & set(_FIXED))
        if fixed:
            raise TypeError(
                f"{where}: {fixed} are fixed by the prior (damping = weight decay = kl_weight * "
                "prior_precision / dataset_size); change prior_precision or kl_weight instead."
            )
        self.dataset_size, self.prior_precision, self.kl_weight = dataset_size, float(prior_precision), float(kl_weight)
        lam = self.kl_weight * self.prior_precision / dataset_size
        self.noise_scale = math.sqrt(self.kl_weight / dataset_size)
        hyper = dict(_ALGORITHM_DEFAULTS, **hyper)
        super().__init__(
            params, lr, seed=seed, curvature=curvature, mc_samples=mc_samples, damping=lam,
            damping_mode="exact", weight_decay=lam, weight_decay_mode="l2", **hyper,
        )
        #: the generator of :meth:`predict` / :meth:`predictive` (never the training generator's
        #: draws: validation does not change the training run); seeded from a copy of it
        self.predict_generator = torch.Generator()
        probe = torch.Generator()
        probe.set_state(self.core.generator.get_state())
        self.predict_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=probe)) ^ 0x5EED)
        #: inside :meth:`sample` (``step()`` is refused there)
        self._sampling = False
        #: ``(step, generator state)`` before the first training draw of the current step
        self._pre_sample: Optional[Tuple[int, Tensor]] = None

    def __setstate__(self, state) -> None:
        """A copy (``deepcopy`` / ``pickle``) is outside :meth:`sample`, with no draw pending."""
        super().__setstate__(state)
        self.__dict__.setdefault("_sampling", False)
        self.__dict__.setdefault("_pre_sample", None)

    @property
    def intrinsic_damping(self) -> float:
        """``λ = kl_weight · prior_precision / dataset_size``."""
        return self.kl_weight * self.prior_precision / self.dataset_size

    # ------------------------------------------------------------------ posterior
    def _noise(self, p: Tensor, eps: Tensor) -> Tensor:
        """``s (C_p + λ I)^-1/2 ε`` for ``ε`` shaped like ``p`` (prior-like ``s / sqrt(λ)`` before
        the first curvature)."""
        lam, s = self.intrinsic_damping, self.noise_scale
        c = self.state.get(p, {}).get("running")
        if c is None:
            return eps * (s / math.sqrt(lam))
        if isinstance(c, Tensor):  # diag
            return eps * s / (c + lam).clamp_min(lam).sqrt()
        if len(c) == 1:  # a bias: (G + λ I)^-1/2, G dense [m, m], diagonal [m] or blocks [B, m, m]
            dg, Qg = _psd_eig(c[0])
            e = eps.reshape(*dg.shape)
            return (s * _from_eig(_to_eig(e, Qg) / (dg + lam).sqrt(), Qg)).reshape(p.shape)
        # a weight: (G ⊗ A + λ I)^-1/2 in the factors' eigenbases, every factor form
        # (KroneckerInverse's: dense, 1-D diagonal, block [B, m, m] over vec(E [B m, n]))
        (dg, Qg), (da, Qa) = _psd_eig(c[0]), _psd_eig(c[1])
        E = eps.reshape(p.shape[0], -1)
        if dg.ndim == 2:  # block form: E [B m, n] -> [B, m, n]
            E = E.reshape(dg.shape[0], dg.shape[1], -1)
        T = _to_eig(E, Qg)
        T = T if Qa is None else T @ Qa
        T = T / (dg[..., :, None] * da[..., None, :] + lam).sqrt()
        T = T if Qa is None else T @ Qa.mT
        return (s * _from_eig(T, Qg)).reshape(p.shape)

    def covariance(self, p: Tensor) -> Tensor:
        """The dense posterior covariance ``[p.numel(), p.numel()]`` of ``p`` (small layers only)."""
        n = p.numel()
        E = torch.eye(n, dtype=working_dtype(p.dtype), device=p.device)
        cols = [self._noise(p, E[i].reshape(p.shape)).flatten() for i in range(n)]
        R = torch.stack(cols, dim=1)  # Σ^{1/2} (symmetric)
        return R @ R.T

    @contextlib.contextmanager
    def sample(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Evaluate the model at ``w ~ N(μ, Σ)`` inside the block; the means are restored on exit,
        the gradients (at ``w``) are kept. ``generator``: where ``ε`` is drawn from (``None``: the
        optimizer's training generator, restored if the step fails). ``step()`` belongs after
        the block (inside it, it is refused)."""
        if self._sampling:
            raise RuntimeError(f"{self._where}: sample() inside sample(); draw one weight sample at a time.")
        gen = self.core.generator if generator is None else generator
        if gen is self.core.generator and (self._pre_sample is None or self._pre_sample[0] != self.core.step):
            self._pre_sample = (self.core.step, gen.get_state().clone())
        params: List[Tensor] = [p for g in self.param_groups for p in g["params"]]
        means = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                eps = torch.randn(p.shape, generator=gen, dtype=working_dtype(p.dtype), device="cpu").to(p.device)
                p.add_(self._noise(p, eps).to(p.dtype))
        self._sampling = True
        try:
            yield
        finally:
            self._sampling = False
            with torch.no_grad():
                for p, m in zip(params, means):
                    p.copy_(m)

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """The step at the means (:class:`NaturalGradient`), after the ``sample()`` block."""
        if self._sampling:
            raise RuntimeError(
                f"{self._where}: step() inside sample(): the means are restored when the block exits, which "
                "would throw the step away. Call opt.step() after the `with opt.sample():` block."
            )
        return super().step(closure)

    def _rollback(self) -> None:
        """A failed step also undoes the weight sample's draws of this step (they come before the
        capture saves the generator)."""
        pre = self._pre_sample
        if pre is not None and pre[0] == self.core.step:
            self.core.generator.set_state(pre[1])
            self.core.generator_before = None
        else:
            super()._rollback()
        self._pre_sample = None

    def _commit(self, plan) -> None:
        super()._commit(plan)
        self._pre_sample = None

    @staticmethod
    def gaussian_nll_scale(noise_std: float) -> float:
        """``1 / (2 σ²)``: multiply a mean ``nn.MSELoss`` by it to train on the Gaussian likelihood
        with noise standard deviation ``σ`` (plain MSE is ``σ² = 1/2``; module docstring)."""
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
            raise ValueError(f"curvlib.optim.NoisyNaturalGradient: noise_std={noise_std!r} must be a number > 0.")
        return 1.0 / (2.0 * float(noise_std) ** 2)

    def _draws(self, fn: Callable[[Tensor], Tensor], x: Tensor, samples: int, generator, where: str) -> Iterator[Tensor]:
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"curvlib.optim.NoisyNaturalGradient.{where}: samples={samples!r} must be an int >= 1.")
        gen = self.predict_generator if generator is None else generator
        for _ in range(samples):
            with self.sample(gen):
                yield fn(x)

    @torch.no_grad()
    def predict(
        self, fn: Callable[[Tensor], Tensor], x: Tensor, samples: int = 10, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """``(1/S) sum_s fn(x)`` at ``S`` posterior samples; ``fn`` returns probabilities
        (e.g. ``lambda x: model(x).softmax(-1)``). Draws from ``generator`` (``None``:
        ``opt.predict_generator``), never from the training generator."""
        total = None
        for out in self._draws(fn, x, samples, generator, "predict"):
            total = out if total is None else total + out
        return total / samples

    @torch.no_grad()
    def predictive(
        self, fn: Callable[[Tensor], Tensor], x: Tensor, samples: int = 10, noise_std: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The predictive mean and standard deviation of a regression output ``fn(x)`` (e.g.
        ``model``): ``mean = (1/S) sum_s f_s``, ``std = sqrt(Var_s[f_s] + noise_std²)`` (the
        population variance over the ``S`` weight samples, plus the observation noise when
        ``noise_std`` is given; see the module docstring for the loss scaling that matches it)."""
        if noise_std is not None:
            self.gaussian_nll_scale(noise_std)  # validates
        outs = torch.stack(list(self._draws(fn, x, samples, generator, "predictive")))
        mean = outs.mean(0)
        var = outs.var(0, correction=0)
        if noise_std is not None:
            var = var + float(noise_std) ** 2
        return mean, var.sqrt()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        sd["curvlib"]["noisy"] = {
            "dataset_size": self.dataset_size, "prior_precision": self.prior_precision, "kl_weight": self.kl_weight,
            "predict_generator": self.predict_generator.get_state().clone(),
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a checkpoint; the prior (``dataset_size``, ``prior_precision``, ``kl_weight``) is the
        checkpoint's, and every group's damping and weight decay are set to its ``λ``, so the step
        and the noise use the same prior (a checkpoint without them keeps this optimizer's prior)."""
        noisy = (state_dict.get("curvlib") or {}).get("noisy")
        super().load_state_dict(state_dict)
        if noisy is not None:
            self.dataset_size = int(noisy["dataset_size"])
            self.prior_precision, self.kl_weight = float(noisy["prior_precision"]), float(noisy["kl_weight"])
            self.noise_scale = math.sqrt(self.kl_weight / self.dataset_size)
            if "predict_generator" in noisy:
                self.predict_generator.set_state(noisy["predict_generator"].to(torch.uint8).cpu())
        lam = self.intrinsic_damping
        for group in self.param_groups:
            group["damping"] = group["weight_decay"] = lam
            group["damping_mode"], group["weight_decay_mode"], group["adaptive_damping"] = "exact", "l2", False
        self._pre_sample = None


def _psd_eig(F: Tensor):
    """``(eigenvalues clamped at 0, eigenvectors)`` of a Kronecker factor in any form: dense
    ``[m, m]``, block ``[B, m, m]`` (batched) or 1-D diagonal ``[m]`` (``(F, None)``: no matrix)."""
    if F.ndim == 1:
        return F.clamp_min(0), None
    d, Q = torch.linalg.eigh(F)
    return d.clamp_min(0), Q


def _to_eig(E: Tensor, Q: Optional[Tensor]) -> Tensor:
    """``Q^T E`` (rows of ``E`` [..., m] or [..., m, n] into the eigenbasis; identity for 1-D)."""
    if Q is None:
        return E
    return (Q.mT @ E.unsqueeze(-1)).squeeze(-1) if E.ndim == Q.ndim - 1 else Q.mT @ E


def _from_eig(T: Tensor, Q: Optional[Tensor]) -> Tensor:
    """``Q T``, the inverse of :func:`_to_eig`."""
    if Q is None:
        return T
    return (Q @ T.unsqueeze(-1)).squeeze(-1) if T.ndim == Q.ndim - 1 else Q @ T


__all__ = ["NoisyNaturalGradient"]
