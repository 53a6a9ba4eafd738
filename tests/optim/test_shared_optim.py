"""NaturalGradient on layers called several times before one backward: a weight-shared model
(with the reference step semantics of docs/design.md §2 on it) and a tiny DCGAN-style D/G step."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import ExactBlockFisher, KFAC
from curvlib.optim import NaturalGradient
from tests.extensions.test_shared_calls import SharedMLP
from tests.optim.common import train_step

LR, LAM = 0.5, 0.1


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["kfac", "exact-ng-blocks"])
def test_one_step_on_a_shared_model_is_the_damped_inverse(name):
    torch.manual_seed(0)
    model, loss_fn = extend(SharedMLP()), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ext = KFAC(fisher_type="type-2") if name == "kfac" else ExactBlockFisher(fisher_type="type-2")
    loss = loss_fn(model(x), y)
    with curvature(ext):
        loss.backward()
    C = [torch.kron(*p.kfac) if name == "kfac" and p.ndim == 2 else (p.kfac[0] if name == "kfac" else p.block_fisher)
         for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradient(
        model.parameters(), lr=LR, curvature=name, fisher_type="type-2", damping=LAM,
        damping_mode="exact", T_cov=1, T_inv=1, kl_clip=None, momentum=0.0, weight_decay=0.0, ema_decay=0.0,
    )
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    for Cp, g, b, p in zip(C, grads, before, model.parameters()):
        want = -LR * torch.linalg.solve(Cp + LAM * torch.eye(Cp.shape[0]), g.flatten())
        torch.testing.assert_close((p.detach() - b).flatten(), want, rtol=1e-6, atol=1e-9)


def test_natural_gradient_trains_a_weight_shared_model():
    torch.manual_seed(0)
    model, loss_fn = extend(SharedMLP()), extend(nn.CrossEntropyLoss())
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature="kfac", fisher_type="mc", damping=1e-2)
    losses = []
    for _ in range(40):
        losses.append(train_step(model, loss_fn, opt, x, y).item())
    assert losses[-1] < 0.6 * losses[0]


class Generator(nn.Module):
    def __init__(self, z=8):
        super().__init__()
        self.fc = nn.Linear(z, 8 * 4 * 4)
        self.up = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)  # 4x4 -> 8x8

    def forward(self, z):
        return torch.tanh(self.up(torch.relu(self.fc(z)).reshape(-1, 8, 4, 4)))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 4, stride=2, padding=1)  # 8x8 -> 4x4
        self.fc = nn.Linear(4 * 4 * 4, 1)

    def forward(self, x):
        return self.fc(nn.functional.leaky_relu(self.conv(x), 0.2).flatten(1))


@pytest.mark.parametrize("curv", ["kfac", "kpsvd"])
def test_dcgan_discriminator_and_generator_steps(curv):
    torch.manual_seed(0)
    G, D = extend(Generator()), extend(Discriminator())
    bce = extend(nn.BCEWithLogitsLoss())
    opt_g = NaturalGradient(G.parameters(), lr=1e-2, curvature="kfac", fisher_type="mc", damping=1e-2)
    opt_d = NaturalGradient(D.parameters(), lr=1e-2, curvature=curv, fisher_type="mc", damping=1e-2)
    real = torch.rand(8, 1, 8, 8) * 2 - 1
    ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)
    for _ in range(3):
        # discriminator: called on real and on fake data, two losses, one backward
        fake = G(torch.randn(8, 8))
        opt_d.zero_grad()
        d_loss = bce(D(real), ones) + bce(D(fake.detach()), zeros)
        with opt_d.capture():
            d_loss.backward()
        d_before = [p.detach().clone() for p in D.parameters()]
        opt_d.step()
        d_curv = D.conv.weight.kfac if curv == "kfac" else D.conv.weight.kpsvd[0]
        # generator: through the discriminator, whose parameters opt_g's capture leaves alone (no
        # factors built for parameters outside the optimizer)
        opt_g.zero_grad()
        g_loss = bce(D(fake), ones)
        with opt_g.capture():
            g_loss.backward()
        assert "kfac" not in D.conv.weight.__dict__ and "kfac" in G.fc.weight.__dict__
        g_before = [p.detach().clone() for p in G.parameters()]
        opt_g.step()
        for ps, before in ((D.parameters(), d_before), (G.parameters(), g_before)):
            for p, b in zip(ps, before):
                assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)
    # D's curvature came from both calls: the conv's A averages the patches of real and fake
    G_, A = d_curv
    assert A.shape == (16, 16) and torch.isfinite(A).all()
