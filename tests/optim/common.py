"""Shared helpers of the optimizer tests: one step, dense references (the MLP and data: :mod:`tests.zoo`)."""
from __future__ import annotations

from typing import List

import torch

from tests.utils import dense_ggn, param_slices, per_sample_grads


def train_step(model, loss_fn, opt, x, y):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    opt.step()
    return loss.detach()


def dense_curvature(model, loss_fn, x, y, fisher_type: str) -> torch.Tensor:
    """The whole-network curvature ``[P, P]`` (type-2: GGN; empirical: mean of grad grad^T)."""
    if fisher_type == "type-2":
        return dense_ggn(model, loss_fn, x, y)
    psg = per_sample_grads(model, loss_fn, x, y)
    U = torch.cat([g.flatten(1) for g in psg.values()], dim=1)
    return U.T @ U / x.shape[0]


def blocks(F: torch.Tensor, model) -> List[torch.Tensor]:
    return [F[s, s] for s in param_slices(model)]


def zoo_step(model, opt, closure=None):
    """One step of ``opt`` on :func:`tests.zoo.data` with cross-entropy (capture and backward)."""
    from curvlib import extend
    from tests.zoo import data

    x, y = data()
    opt.zero_grad()
    loss = extend(torch.nn.CrossEntropyLoss())(model(x), y)
    with opt.capture():
        loss.backward()
    return opt.step(closure)


def schedule_trace(model, loss_fn, opt, steps: int):
    """Steps of ``opt`` on :func:`tests.zoo.data` (seed = step): per step, whether
    ``opt.capture()`` captured (a ``CaptureTransaction``) and whether ``step()`` built an
    inverse. Returns the two lists of step indices."""
    from tests.zoo import data

    caps, invs = [], []
    for k in range(steps):
        x, y = data(seed=k)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        ctx = opt.capture()
        caps.append(type(ctx).__name__ == "CaptureTransaction")
        with ctx:
            loss.backward()
        before = opt.core.groups[0].inv_updates
        opt.step()
        invs.append(opt.core.groups[0].inv_updates > before)
    return [k for k, c in enumerate(caps) if c], [k for k, i in enumerate(invs) if i]


def noisy_step(model, loss_fn, opt, x, y, scale: float = 1.0):
    """One ``NoisyNaturalGradient`` step: the backward (loss times ``scale``) at weights drawn by
    ``opt.sample()``, the step after the block has restored the means."""
    opt.zero_grad()
    with opt.sample():
        loss = loss_fn(model(x), y)
        if scale != 1.0:
            loss = loss * scale
        with opt.capture():
            loss.backward()
    opt.step()
