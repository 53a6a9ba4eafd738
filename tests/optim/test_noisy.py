"""NoisyNaturalGradient on Bayesian linear regression: one Linear(d, 1, bias=False), MSE (mean),
i.e. a Gaussian likelihood with σ² = 1/2 (NLL = N · loss) and the prior N(0, α^-1 I). The
Kronecker curvature (and the diagonal one, for orthogonal features) is exact, so the posterior
covariance must equal the closed form ``(2 X^T X + α I)^-1`` and the iterates must average to the
posterior mean ``(2 X^T X + α I)^-1 2 X^T y``; samples from ``sample()`` have that covariance."""
import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NoisyNaturalGradient
from tests.optim.common import noisy_step
from tests.utils import dense_kron_terms
from tests.zoo import factor_form_net

pytestmark = pytest.mark.usefixtures("float64")

N, D, ALPHA = 200, 3, 300.0


def problem(orthogonal: bool):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    if orthogonal:
        Q, _ = torch.linalg.qr(X)
        X = Q * torch.tensor([9.0, 5.0, 3.0])
    w = torch.tensor([[1.0, -2.0, 0.5]])
    y = X @ w.T + 0.5 * torch.randn(N, 1, generator=g)
    P = 2 * X.T @ X + ALPHA * torch.eye(D)
    cov = torch.linalg.inv(P)
    mean = cov @ (2 * X.T @ y).flatten()
    return X, y, mean, cov


@pytest.mark.parametrize("curvature", ["kfac", "diag"])
def test_fixed_point_is_the_exact_posterior(curvature):
    X, y, mean, cov = problem(orthogonal=curvature == "diag")
    torch.manual_seed(0)
    model = extend(nn.Linear(D, 1, bias=False))
    loss_fn = extend(nn.MSELoss())
    opt = NoisyNaturalGradient(model.parameters(), lr=0.5, dataset_size=N, prior_precision=ALPHA,
                               curvature=curvature, fisher_type="type-2", ema_decay=0.0, seed=0)
    iterates = []
    for k in range(300):
        noisy_step(model, loss_fn, opt, X, y)
        if k >= 100:
            iterates.append(model.weight.detach().flatten().clone())
    W = model.weight
    torch.testing.assert_close(opt.covariance(W), cov, rtol=1e-8, atol=1e-12)
    avg = torch.stack(iterates).mean(0)
    std = cov.diagonal().sqrt()
    err = ((avg - mean).abs() / std).max()
    assert err < 0.25  # measured ~0.05 (kfac) / 0.02 (diag); the prior moves it 7-30 std off OLS
    # the samples drawn by sample() have the posterior covariance
    draws = []
    for _ in range(4000):
        with opt.sample():
            draws.append(W.detach().flatten().clone())
    draws = torch.stack(draws)
    emp = torch.cov(draws.T)
    torch.testing.assert_close(emp, cov, rtol=0.1, atol=0.1 * float(cov.diagonal().max()))
    assert torch.equal(W.detach(), model.weight.detach())  # means restored


def test_predict_and_bad_args():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3)))
    opt = NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=10, prior_precision=1.0, seed=1)
    x = torch.randn(5, 4)
    before = model[0].weight.detach().clone()
    probs = opt.predict(lambda x: model(x).softmax(-1), x, samples=4)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert torch.equal(model[0].weight.detach(), before)
    assert opt.intrinsic_damping == pytest.approx(0.1) and opt.noise_scale == pytest.approx(10 ** -0.5)
    with pytest.raises(TypeError, match="fixed by the prior"):
        NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=10, prior_precision=1.0, damping=1.0)
    with pytest.raises(ValueError, match="curvature"):
        NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=10, prior_precision=1.0, curvature="kpsvd")
    with pytest.raises(ValueError, match="prior_precision"):
        NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=10, prior_precision=0.0)


@pytest.mark.parametrize("layer", ["embedding", "grouped"])
def test_posterior_of_diagonal_and_block_factors(layer):
    """The posterior covariance ``s^2 (C + λ I)^-1`` of an Embedding (1-D token-frequency factor)
    and of a grouped convolution (block-form factors), weight and bias, against the dense matrix of
    the same factors: sampling raised NotImplementedError on these forms."""
    model, x = factor_form_net(layer, 32)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    y = torch.randint(0, 3, (32,))
    opt = NoisyNaturalGradient(model.parameters(), lr=0.1, dataset_size=500, prior_precision=10.0,
                               curvature="kfac", fisher_type="type-2", ema_decay=0.0, seed=0)
    for _ in range(2):
        noisy_step(model, loss_fn, opt, x, y)
    lam, s2 = opt.intrinsic_damping, opt.noise_scale**2
    for p in model[0].parameters():
        C = dense_kron_terms(opt.state[p]["running"])
        want = s2 * torch.linalg.inv(C + lam * torch.eye(p.numel()))
        torch.testing.assert_close(opt.covariance(p), want, rtol=1e-8, atol=1e-12)
