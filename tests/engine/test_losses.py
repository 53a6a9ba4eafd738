"""Loss adapters: type-2 square roots and MC samples against torch.func Hessians."""
import pytest
import torch
from torch import nn
from torch.func import hessian

from curvlib.engine.losses import loss_adapter_for


pytestmark = pytest.mark.usefixtures("float64")


def cases():
    ce_y = lambda *s: torch.randint(0, 4, s)
    return {
        "ce": (nn.CrossEntropyLoss, (5, 4), lambda: ce_y(5)),
        "ce_positions": (nn.CrossEntropyLoss, (3, 4, 2), lambda: ce_y(3, 2)),
        "ce_ignore": (nn.CrossEntropyLoss, (5, 4), lambda: torch.tensor([0, -100, 2, 3, -100])),
        "mse": (nn.MSELoss, (5, 3), lambda: torch.randn(5, 3)),
        "mse_positions": (nn.MSELoss, (3, 2, 3), lambda: torch.randn(3, 2, 3)),
        "bce": (nn.BCEWithLogitsLoss, (5, 3), lambda: torch.rand(5, 3).round()),
    }


def dense_hessian(loss_fn, f, y):
    return hessian(lambda o: loss_fn(o, y))(f).reshape(f.numel(), f.numel())


def per_sample_blocks(S):
    """``sum_k S_kn S_kn^T`` for every sample ``n`` as the block diagonal ``[N*D, N*D]``
    (samples are independent, so only these blocks of the Hessian are needed)."""
    S = S.reshape(S.shape[0], S.shape[1], -1)
    return torch.block_diag(*torch.einsum("kni,knj->nij", S, S))


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_sqrt_factors_the_loss_hessian(name, reduction):
    make, shape, make_y = cases()[name]
    loss_fn, f, y = make(reduction=reduction), torch.randn(*shape), make_y()
    S = loss_adapter_for(loss_fn).type2_cotangents(loss_fn, f, y, exact=True)
    torch.testing.assert_close(per_sample_blocks(S), dense_hessian(loss_fn, f, y))


@pytest.mark.parametrize("name", ["ce", "mse", "bce"])
def test_mc_samples_estimate_the_hessian(name):
    make, shape, make_y = cases()[name]
    loss_fn, f, y = make(), torch.randn(*shape), make_y()
    S = loss_adapter_for(loss_fn).mc_cotangents(loss_fn, f, y, 40000)
    H = dense_hessian(loss_fn, f, y)
    assert (per_sample_blocks(S) - H).norm() / H.norm() < 0.03


def test_nll_on_log_probs_gives_the_softmax_fisher():
    f, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    nll = nn.NLLLoss()
    S = loss_adapter_for(nll).type2_cotangents(nll, f.log_softmax(1), y, exact=True)
    # back-propagated through log_softmax, the NLL Fisher is the CE Hessian
    J = torch.func.jacrev(lambda o: o.log_softmax(1))(f).reshape(f.numel(), f.numel())
    S = (S.reshape(S.shape[0], -1) @ J).reshape(S.shape)
    torch.testing.assert_close(per_sample_blocks(S), dense_hessian(nn.CrossEntropyLoss(), f, y))
    with pytest.raises(ValueError, match="log-probabilities"):
        loss_adapter_for(nll).type2_cotangents(nll, f, y, exact=True)


@pytest.mark.parametrize("loss_fn, target", [
    (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 4, (n,))),
    (nn.MSELoss(), lambda n: torch.randn(n, 4)),
    (nn.BCEWithLogitsLoss(), lambda n: torch.rand(n, 4).round()),
])
def test_mc_draws_come_from_the_context_generator(loss_fn, target):
    """``curvature(..., generator=g)`` draws the MC targets from ``g``: the same generator state
    gives the same factors whatever the global RNG did in between (checkpoint/resume relies on it)."""
    from curvlib import curvature, extend
    from curvlib.extensions import KFAC

    model = extend(nn.Sequential(nn.Linear(3, 4)))
    loss_fn = extend(loss_fn)
    x, y = torch.randn(8, 3), target(8)
    out = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(7)
        with curvature(KFAC(fisher_type="mc", mc_samples=3), generator=gen):
            loss_fn(model(x), y).backward()
        out.append(model[0].weight.kfac[0].clone())
    assert torch.equal(out[0], out[1])
    gen = torch.Generator().manual_seed(8)
    with curvature(KFAC(fisher_type="mc", mc_samples=3), generator=gen):
        loss_fn(model(x), y).backward()
    assert not torch.equal(out[0], model[0].weight.kfac[0])
