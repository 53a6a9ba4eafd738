"""KFAC of a layer called several times before one backward, against curvlinops.

- expand: a GAN's discriminator on real and fake data (two extended losses) equals curvlinops'
  ``KFACLinearOperator`` on the equivalent network that takes the two batches stacked along a
  position dimension (type-2 and empirical exactly, mc by convergence to that type-2).
- curvlinops' own hooks on a shared module add ``A`` over the calls (curvlib averages: the
  stacked-position convention), so on the shared model itself ``C kron(G, A)`` (``C`` calls)
  equals curvlinops' block, for expand and reduce.
"""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from tests.extensions.test_kfac import curvlinops_blocks
from tests.extensions.test_shared_calls import SharedMLP, UnrolledRNN

pytestmark = pytest.mark.usefixtures("float64")

N = 6


def discriminator():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))


def gan_kfac(D, real, fake, **kw):
    """KFAC of ``bce(D(real), 1) + bce(D(fake), 0)`` (reduction "sum"), one backward."""
    extend(D)
    lr, lf = extend(nn.BCEWithLogitsLoss(reduction="sum")), extend(nn.BCEWithLogitsLoss(reduction="sum"))
    D.zero_grad()
    loss = lr(D(real), torch.ones(len(real), 1)) + lf(D(fake), torch.zeros(len(fake), 1))
    with curvature(KFAC(**kw)):
        loss.backward()
    return [torch.kron(*p.kfac) if len(p.kfac) == 2 else p.kfac[0] for p in D.parameters()]


def stacked_reference(D, real, fake, fisher_type):
    """curvlinops on the same layers with the batches stacked as positions ``[N, 2, 4]``."""
    xs = torch.stack([real, fake], dim=1)
    ys = torch.stack([torch.ones(len(real), 1), torch.zeros(len(fake), 1)], dim=1)
    return curvlinops_blocks(D, nn.BCEWithLogitsLoss(reduction="sum"), xs, ys, fisher_type=fisher_type)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_gan_discriminator_equals_curvlinops_on_stacked_positions(fisher_type):
    D = discriminator()
    real, fake = torch.randn(N, 4), torch.randn(N, 4) + 1.0
    ours = gan_kfac(D, real, fake, fisher_type=fisher_type)
    ref = stacked_reference(D, real, fake, fisher_type)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_gan_discriminator_mc_converges_to_curvlinops_type2():
    D = discriminator()
    real, fake = torch.randn(N, 4), torch.randn(N, 4) + 1.0
    ours = gan_kfac(D, real, fake, fisher_type="mc", mc_samples=20000)
    ref = stacked_reference(D, real, fake, "type-2")
    for a, b in zip(ours, ref):
        assert (a - b).norm() / b.norm() < 0.05
    few = gan_kfac(D, real, fake, fisher_type="mc", mc_samples=1)
    assert (few[0] - ref[0]).norm() / ref[0].norm() > 0.05  # it is random


class SharedSequence(nn.Module):
    """A Linear on ``[N, P, D]`` applied twice in sequence (weight sharing inside each call, and
    across the calls), then a head on the mean over positions."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h.mean(1))


MODELS = {
    "shared_mlp": (SharedMLP, lambda: torch.randn(N, 4), {"mid": 2}),
    "unrolled_rnn": (UnrolledRNN, lambda: torch.randn(N, 3, 3), {"inp": 3, "cell": 3}),
    "shared_sequence": (SharedSequence, lambda: torch.randn(N, 5, 4), {"lin": 2}),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_shared_model_is_curvlinops_hooks_over_the_number_of_calls(model, fisher_type, kfac_approx):
    make, make_x, calls = MODELS[model]
    net = make()
    x, y = make_x(), torch.randint(0, 3, (N,))
    ref = curvlinops_blocks(net, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type, kfac_approx=kfac_approx)
    extend(net)
    loss_fn = extend(nn.CrossEntropyLoss())
    loss = loss_fn(net(x), y)
    with curvature(KFAC(fisher_type=fisher_type, kfac_approx=kfac_approx)):
        loss.backward()
    for (name, p), b in zip(net.named_parameters(), ref):
        C = calls.get(name.split(".")[0], 1)
        ours = torch.kron(*p.kfac) * C if p.ndim == 2 else p.kfac[0]
        torch.testing.assert_close(ours, b)


def test_reduce_reduces_within_each_call_then_calls_are_positions():
    """The definition, written out: abar_c = mean_t a_c, sbar_c = sum_t s_c (empirical)."""
    net = extend(SharedSequence())
    x, y = torch.randn(N, 5, 4), torch.randint(0, 3, (N,))
    acts, grads = [], []
    h1 = net.lin(x)
    h1.register_hook(grads.append)
    a2 = torch.tanh(h1)
    h2 = net.lin(a2)
    h2.register_hook(grads.append)
    loss = extend(nn.CrossEntropyLoss())(net.head(torch.tanh(h2).mean(1)), y)
    with curvature(KFAC(fisher_type="empirical", kfac_approx="reduce")):
        loss.backward()
    abar = torch.stack([x.mean(1), a2.detach().mean(1)], 1)  # [N, 2 calls, D]
    sbar = torch.stack([g.sum(1) for g in grads[::-1]], 1) * N ** 0.5  # empirical scale sqrt(N)
    A = abar.reshape(-1, 4).T @ abar.reshape(-1, 4) / (2 * N)
    G = sbar.reshape(-1, 4).T @ sbar.reshape(-1, 4)
    Gw, Aw = net.lin.weight.kfac
    torch.testing.assert_close(Aw, A)
    torch.testing.assert_close(Gw, G)
