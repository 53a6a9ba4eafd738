"""Rank-2 Kronecker curvatures whose sum is indefinite: the optimizer steps with the inverse
clipped at the damping floor (``KroneckerInverse``, ``damping_mode="pi"``) and counts the clipped
eigenvalue pairs in ``opt.state[p]["inverse_clipped"]`` (float64)."""
import warnings

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient
from curvlib.solvers import KroneckerInverse
from curvlib.solvers import kronecker_inverse as ki
from tests.zoo import data, mlp

pytestmark = pytest.mark.usefixtures("float64")

LR, LAM = 0.1, 1e-4


def one_step(seed, n, curvature="lanczos"):
    model, loss_fn = mlp(seed), extend(nn.CrossEntropyLoss())
    x, y = data(n, seed)
    opt = NaturalGradient(model.parameters(), lr=LR, curvature=curvature, fisher_type="empirical", damping=LAM,
                          damping_mode="pi", momentum=0.0, kl_clip=None, T_cov=1, T_inv=1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return model, opt, before, grads


def test_indefinite_rank2_curvature_steps_with_the_clipped_inverse(monkeypatch):
    monkeypatch.setattr(ki, "_announced", [False])
    with pytest.warns(RuntimeWarning, match="indefinite"):
        model, opt, before, grads = one_step(6, 3)  # 3 samples: the first weight's rank-2 sum is indefinite
    W = model[0].weight
    C = opt.state[W]["running"]
    with pytest.raises(ValueError, match="non-SPD"):  # what the optimizer met before the floor
        KroneckerInverse(C, LAM, "pi", indefinite="raise")
    P = KroneckerInverse(C, LAM, "pi")
    assert opt.state[W]["inverse_clipped"] == P.clipped > 0
    M = P.damped_matrix()
    assert torch.linalg.eigvalsh(M).min() > 0
    d = torch.linalg.solve(M, grads[0].reshape(-1)).reshape(W.shape)
    torch.testing.assert_close(W.detach() - before[0], -LR * d, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("curvature", ["lanczos", "deflation"])
def test_psd_rank2_curvature_is_not_clipped(curvature):
    # empirical Fisher of 2 samples, T = 1: each weight block's rearrangement has rank <= 2, so the
    # rank-2 approximation is the block itself: PSD, and singular (quotients of exactly the
    # damping where the null spaces meet -- within the slack, not clipped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, opt, before, grads = one_step(0, 2, curvature)
    for p, b, g in zip(model.parameters(), before, grads):
        assert opt.state[p]["inverse_clipped"] == 0
        if p.dim() == 1:
            continue
        C = opt.state[p]["running"]
        K = sum(torch.kron(G, A) for G, A in C)
        assert torch.linalg.eigvalsh(K).min() > -1e-12 * torch.linalg.eigvalsh(K).max()
        # the step is the unclipped pi-damped rank-2 inverse
        M = KroneckerInverse(C, LAM, "pi", indefinite="raise").damped_matrix()
        d = torch.linalg.solve(M, g.reshape(-1)).reshape(p.shape)
        torch.testing.assert_close(p.detach() - b, -LR * d, rtol=1e-7, atol=1e-12)
