"""``exact-ng`` / ``exact-ng-blocks`` keep per-sample factors ``U`` (rows = the samples of one
batch). With ``T_cov > 1`` and a layer used only on some steps, the factors of a layer that a
capture did not see are from an earlier batch: they must never be solved together with the new
batch's (row ``i`` of two batches is not one sample), whatever the batch sizes."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient

pytestmark = pytest.mark.usefixtures("float64")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x, use_b):
        return self.a(x) + self.b(x) if use_b else self.a(x)


def _run(curv, batches, permute_first=False):
    """Steps with ``T_cov=2``: (capture, both) (plain, a) (capture, a only) (plain, both)."""
    torch.manual_seed(0)
    model = extend(Branchy())
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature=curv, fisher_type="empirical", damping=0.1,
                          ema_decay=0.0, T_cov=2, curvature_warmup=0, kl_clip=None, seed=0)
    uses = [True, False, False, True]
    for k, ((x, y), use_b) in enumerate(zip(batches, uses)):
        if k == 0 and permute_first:
            perm = torch.arange(x.shape[0]).flip(0)
            x, y = x[perm], y[perm]
        opt.zero_grad()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with opt.capture():
            loss_fn(model(x, use_b), y).backward()
        opt.step()
    return {n: (before[n] - p.detach()) for n, p in model.named_parameters()}, model, opt


def _batches(sizes):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("curv", ["exact-ng", "exact-ng-blocks"])
def test_stale_per_sample_factors_are_never_combined(curv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = _batches([6, 6, 6, 6])
        upd, model, opt = _run(curv, batches)
        upd_perm, _, _ = _run(curv, batches, permute_first=True)
    # the last update does not depend on the order of samples in an old batch
    for n in upd:
        torch.testing.assert_close(upd[n], upd_perm[n], rtol=1e-10, atol=1e-12)
    # b was not in the last capture: it takes the plain step (-lr g), its old factors are gone
    assert "running" not in opt.state[model.b.weight]
    torch.testing.assert_close(upd["b.weight"], 0.1 * model.b.weight.grad)


@pytest.mark.parametrize("curv", ["exact-ng", "exact-ng-blocks"])
def test_batch_sizes_that_differ_between_captures(curv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        upd, model, opt = _run(curv, _batches([8, 5, 3, 7]))
    assert all(torch.isfinite(u).all() for u in upd.values())
    # a's last update is the exact natural gradient of the batch of the last capture (3 samples)
    U = opt.state[model.a.weight]["running"]
    assert U.shape[0] == 3 and opt.state[model.a.bias]["running"].shape[0] == 3
    assert "running" not in opt.state[model.b.bias]


def test_resume_keeps_the_batch_of_the_inverse():
    """T_inv > T_cov: after a checkpoint, the inverse is rebuilt from the snapshots of one batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        loss_fn = extend(nn.CrossEntropyLoss())
        opt = NaturalGradient(model.parameters(), lr=0.1, curvature="exact-ng", fisher_type="empirical",
                              ema_decay=0.0, T_cov=1, T_inv=3, seed=0)
        batches = _batches([5, 4, 6, 5])
        for x, y in batches[:2]:
            opt.zero_grad()
            with opt.capture():
                loss_fn(model(x), y).backward()
            opt.step()
        sd = opt.state_dict()
        model2 = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        model2.load_state_dict(model.state_dict())
        opt2 = NaturalGradient(model2.parameters(), lr=0.1, curvature="exact-ng", fisher_type="empirical",
                               ema_decay=0.0, T_cov=1, T_inv=3, seed=0)
        opt2.load_state_dict(sd)
        for m, o in ((model, opt), (model2, opt2)):
            x, y = batches[2]
            o.zero_grad()
            with o.capture():
                loss_fn(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
