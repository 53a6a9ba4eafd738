"""PCHMP: positive-curvature Hessian block products (Chen et al.), natively.

- ``convention="backpack"`` equals BackPACK 1.7.1's ``PCHMP`` (abs and clip) on a CNN;
- the default (``"paper"``) equals a hand-built dense PCH block (residual ``m(φ''(z) δ)``);
- where every residual is non-negative, PCH(clip) is the Hessian; blocks are PSD;
- operations with unknown second-order terms are refused.
"""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import HMP, PCHMP

pytestmark = pytest.mark.usefixtures("float64")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 5), nn.Tanh(),
        nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3),
    )


def dense_blocks(model, ext_field, n):
    out = []
    for p in model.parameters():
        k = p.numel()
        out.append(getattr(p, ext_field)(torch.eye(k).reshape(k, *p.shape)).reshape(k, k))
    return out


@pytest.mark.parametrize("modify", ["abs", "clip"])
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss, nn.MSELoss])
def test_backpack_convention_equals_backpack(modify, loss):
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import PCHMP as BPPCHMP

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (6,), generator=g) if loss is nn.CrossEntropyLoss else torch.randn(6, 3, generator=g)
    m1, l1 = extend(cnn()), extend(loss())
    with curvature(PCHMP(modify, convention="backpack")):
        l1(m1(x), y).backward()
    m2, l2 = bp_extend(cnn()), bp_extend(loss())
    with backpack(BPPCHMP(modify=modify)):
        l2(m2(x), y).backward()
    for p, q in zip(m1.parameters(), m2.parameters()):
        V = torch.randn(3, *p.shape, generator=g)
        ref = q.pchmp(V).detach()
        torch.testing.assert_close(p.pchmp(V), ref, rtol=1e-10, atol=1e-14)
        assert ref.abs().max() > 0


@pytest.mark.parametrize("modify", ["abs", "clip"])
def test_paper_convention_equals_dense_reference(modify):
    """First-layer block of Linear -> Sigmoid -> Linear -> CE (mean):
    ``sum_n kron(H_n, x_n x_n^T)``, ``H_n = D W2^T S_n W2 D + diag(m(φ''(z_n) δ_n))``,
    ``D = diag(φ'(z_n))``, ``S_n`` the CE Hessian of sample n, ``δ_n = W2^T ∂L/∂f_n``."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    with curvature(PCHMP(modify)):
        loss_fn(model(x), y).backward()
    N = x.shape[0]
    W1, b1, W2 = model[0].weight, model[0].bias, model[2].weight
    z = (x @ W1.T + b1).detach()
    s = torch.sigmoid(z)
    d1, d2 = s * (1 - s), s * (1 - s) * (1 - 2 * s)
    prob = torch.softmax(model(x), 1).detach()
    S = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / N
    dLdf = (prob - nn.functional.one_hot(y, 3)) / N
    delta = dLdf @ W2.detach()
    r = d2 * delta
    r = r.abs() if modify == "abs" else r.clamp(min=0)
    H = torch.einsum("ni,ji,njk,kl,nl->nil", d1, W2.detach(), S, W2.detach(), d1)
    H = H + torch.diag_embed(r)
    ref = torch.einsum("nij,na,nb->iajb", H, x, x).reshape(20, 20)
    ref_b = H.sum(0)
    got = dense_blocks(model, "pchmp", N)
    torch.testing.assert_close(got[0], ref)
    torch.testing.assert_close(got[1], ref_b)
    assert torch.linalg.eigvalsh(got[0]).min() > -1e-12  # PSD


def test_abs_minus_hessian_is_psd_and_last_layer_is_hessian():
    """PCH(abs) - Hessian = sum over activations of J^T (|R| - R) J: PSD; a layer with no
    activation downstream has PCH block = Hessian block."""
    model = extend(cnn())
    loss_fn = extend(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g)
    with curvature(HMP(), PCHMP("abs")):
        loss_fn(model(x), y).backward()
    for p in model.parameters():
        k = p.numel()
        E = torch.eye(k).reshape(k, *p.shape)
        D = (p.pchmp(E) - p.hmp(E)).reshape(k, k)  # = J^T (|R| - R) J-type terms: PSD
        torch.testing.assert_close(D, D.T)
        assert torch.linalg.eigvalsh(D).min() > -1e-10
    last = list(model.parameters())[-2]  # last layer: no activation downstream, PCH = Hessian
    E = torch.eye(last.numel()).reshape(-1, *last.shape)
    torch.testing.assert_close(last.pchmp(E), last.hmp(E))


def test_unknown_nonlinearity_is_refused():
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(PCHMP("abs")):
        loss_fn(model(torch.randn(3, 4)), torch.tensor([0, 1, 2])).backward()
    with pytest.raises(NotImplementedError, match="softplus"):
        model[0].weight.pchmp(torch.randn(1, 5, 4))


def test_operator_refused_and_bad_args():
    with pytest.raises(ValueError, match="modify"):
        PCHMP("square")
    with pytest.raises(ValueError, match="convention"):
        PCHMP("abs", convention="other")
    with pytest.raises(NotImplementedError, match="block"):
        PCHMP("abs").operator()
