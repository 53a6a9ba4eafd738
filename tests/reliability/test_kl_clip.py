"""``kl_clip``: each parameter's own learning rate (Preconditioner with per-layer lrs), and the
documented fact that a binding clip cancels the lr."""
from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient, Preconditioner
from curvlib.optim.running import CORE_HYPERPARAMETERS

pytestmark = pytest.mark.usefixtures("float64")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _model():
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))), extend(nn.CrossEntropyLoss())


def _directions(lrs, kl_clip):
    """The Preconditioner's directions (and the raw gradients) with per-layer lrs ``lrs``."""
    model, loss_fn = _model()
    sgd = torch.optim.SGD([{"params": model[0].parameters(), "lr": lrs[0]},
                           {"params": model[2].parameters(), "lr": lrs[1]}])
    pre = Preconditioner(model.parameters(), optimizer=sgd, curvature="kfac", fisher_type="type-2",
                         kl_clip=kl_clip, seed=0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pre.capture():
        loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pre.step()
    lr_of = {p: g["lr"] for g in sgd.param_groups for p in g["params"]}
    return [p.grad.clone() for p in model.parameters()], grads, [lr_of[p] for p in model.parameters()]


@pytest.mark.parametrize("lrs", [(1e-3, 1.0), (1.0, 1e-3)])
def test_preconditioner_clips_with_each_parameters_lr(lrs):
    """KL of the applied update ``lr_p nu d_p``: ``sum_p lr_p^2 nu^2 <d_p, g_p>`` = kl_clip when binding."""
    d, g, lr = _directions(lrs, None)
    kl = sum(r * r * float((a * b).sum()) for a, b, r in zip(d, g, lr))
    kl_clip = kl / 100  # binds: nu = 0.1
    clipped, _, _ = _directions(lrs, kl_clip)
    nus = [float((c * a).sum() / (a * a).sum()) for c, a in zip(clipped, d)]
    assert nus == pytest.approx([0.1] * 4, rel=1e-9)


def test_binding_kl_clip_cancels_the_lr_and_the_docs_say_so():
    runs = []
    for lr in (0.1, 0.3, 1.0):
        model, loss_fn = _model()
        opt = NaturalGradient(model.parameters(), lr=lr, curvature="kfac", kl_clip=1e-6, seed=0)
        torch.manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            opt.zero_grad()
            with opt.capture():
                loss_fn(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(runs[0], runs[2], rtol=1e-10, atol=1e-12)
    meaning = next(hp for hp in CORE_HYPERPARAMETERS if hp.name == "kl_clip").meaning
    assert "cancels the lr" in meaning and "optimizers.md" in meaning
    guide = " ".join((ROOT / "docs" / "user_guide" / "optimizers.md").read_text().split())
    assert "### kl_clip and the learning rate" in guide and "learning rate cancels" in guide
    assert "kl_clip" in (NaturalGradient.__doc__ or "") and "cancels the lr" in (NaturalGradient.__doc__ or "")
