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
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import Tensor

from curvlib.optim.core import CHECK_SYNC, PROCESS_GROUP, SEED
from curvlib.optim.hyperparams import REQUIRED, HyperParameter, Rule, check_value, document, number, replace_entries
from curvlib.optim.natural_gradient import NaturalGradient

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
        E = torch.eye(n, dtype=p.dtype, device=p.device)
        cols = [self._noise(p, E[i].reshape(p.shape)).flatten() for i in range(n)]
        R = torch.stack(cols, dim=1)  # Σ^{1/2} (symmetric)
        return R @ R.T

    @contextlib.contextmanager
    def sample(self) -> Iterator[None]:
        """Evaluate the model at ``w ~ N(μ, Σ)`` inside the block (draws from the optimizer's
        generator); the means are restored on exit, the gradients (at ``w``) are kept."""
        params: List[Tensor] = [p for g in self.param_groups for p in g["params"]]
        means = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                eps = torch.randn(p.shape, generator=self.core.generator, dtype=p.dtype, device="cpu").to(p.device)
                p.add_(self._noise(p, eps))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, m in zip(params, means):
                    p.copy_(m)

    @torch.no_grad()
    def predict(self, fn: Callable[[Tensor], Tensor], x: Tensor, samples: int = 10) -> Tensor:
        """``(1/S) sum_s fn(x)`` at ``S`` posterior samples; ``fn`` returns probabilities
        (e.g. ``lambda x: model(x).softmax(-1)``)."""
        if samples < 1:
            raise ValueError(f"curvlib.optim.NoisyNaturalGradient.predict: samples={samples!r} must be >= 1.")
        total = None
        for _ in range(samples):
            with self.sample():
                out = fn(x)
            total = out if total is None else total + out
        return total / samples


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
