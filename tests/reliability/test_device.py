"""Device-aware tests (the ``device`` fixture: CUDA when available, else the CPU): every quantity,
factor, inverse and optimizer step is computed on the model's device, with no tensor built on
another one (the coupling probe, the convolution Gram plan, the pi-damped block matrix), and equals
the float64 CPU reference. On a CPU-only machine they run on the CPU."""
import copy

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad, DiagGGN, EKFAC
from curvlib.optim import NaturalGradient
from curvlib.solvers import KroneckerInverse

pytestmark = pytest.mark.usefixtures("float64")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.Tanh(), nn.Linear(6, 20),
    ).eval()


def data(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 5, 5, generator=g).to(device), torch.randint(0, 20, (5,), generator=g).to(device)


def capture(device, *exts):
    model = extend(cnn().to(device))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data(device)
    with curvature(*exts):
        loss_fn(model(x), y).backward()
    return model


def leaves(v):
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in leaves(x)]
    return [v]


def test_engine_quantities_on_device(device):
    exts = lambda: (BatchGrad(), DiagGGN(fisher_type="type-2"), KFAC(fisher_type="type-2", max_factor_dim=19))
    ours, ref = capture(device, *exts()), capture(torch.device("cpu"), *exts())
    for p, q in zip(ours.parameters(), ref.parameters()):
        for field in ("grad_batch", "diag_ggn", "kfac"):
            for a, b in zip(leaves(p.__dict__[field]), leaves(q.__dict__[field])):
                assert a.device.type == device.type, field
                torch.testing.assert_close(a.cpu(), b)


def test_ekfac_on_device(device):
    ours, ref = capture(device, EKFAC(fisher_type="type-2")), capture(torch.device("cpu"), EKFAC(fisher_type="type-2"))
    for p, q in zip(ours.parameters(), ref.parameters()):
        Sp, Sq = p.ekfac[1], q.ekfac[1]
        assert Sp.device.type == device.type
        # (eigenvectors are unique up to sign and rotations in repeated eigenvalues: compare S's sum)
        torch.testing.assert_close(Sp.sum().cpu(), Sq.sum())


def test_coupling_probe_on_device(device):
    """BatchNorm in training mode: the probe column is built on the output's device and KFAC warns."""
    model = extend(cnn().train().to(device))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data(device)
    with pytest.warns(UserWarning, match="independent"):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    assert model[0].weight.kfac[0].device.type == device.type


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_kronecker_inverse_forms_on_device(device, mode):
    g = torch.Generator().manual_seed(2)

    def spd(d, *batch):
        X = torch.randn(*batch, d + 3, d, generator=g)
        return X.transpose(-1, -2) @ X

    forms = [
        [[spd(4), spd(3)]],
        [[torch.rand(4, generator=g) + 0.1, spd(3)]],  # 1-D (max_factor_dim, Embedding)
        [[spd(2, 2), spd(3, 2)]],  # block form [2, 2, 2], [2, 3, 3]
        [[spd(4), spd(3)], [spd(4), spd(3)]],  # two terms
    ]
    for terms in forms:
        V = torch.randn(4, 3, generator=g)  # (the block form: [B m, n] = [4, 3])
        ref = KroneckerInverse(terms, 1e-2, mode)
        ours = KroneckerInverse([[f.to(device) for f in t] for t in terms], 1e-2, mode)
        out = ours(V.to(device))
        assert out.device.type == device.type
        torch.testing.assert_close(out.cpu(), ref(V))
        if mode == "pi" or len(terms) == 1:
            torch.testing.assert_close(ours.damped_matrix().cpu(), ref.damped_matrix())


@pytest.mark.parametrize("curv", ["kfac", "diag"])
def test_optimizer_step_on_device(device, curv):
    model = cnn()
    loss_fn = nn.CrossEntropyLoss()
    results = []
    for dev in (device, torch.device("cpu")):
        m = extend(copy.deepcopy(model).to(dev))
        lf = extend(copy.deepcopy(loss_fn))
        opt = NaturalGradient(m.parameters(), lr=0.1, curvature=curv, fisher_type="type-2", damping=1e-2, momentum=0.9,
                              kl_clip=1e-2, max_factor_dim=19, seed=0)
        x, y = data(dev)
        for _ in range(2):
            opt.zero_grad()
            loss = lf(m(x), y)
            with opt.capture():
                loss.backward()
            opt.step()
        results.append([p.detach() for p in m.parameters()])
    for a, b in zip(*results):
        assert a.device.type == device.type
        torch.testing.assert_close(a.cpu(), b)
