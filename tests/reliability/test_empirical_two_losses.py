"""Two extended losses with the empirical Fisher (issue 7, item 4).

Definition: a sample's loss ``l_n`` enters the objective with the weight
``kappa = (d objective / d loss) / N'``; the empirical Fisher is
``kappa sum_n grad l_n grad l_n^T``. It was the scale of the last loss processed (``ce + mse``
gave 5x ``mse + ce`` with 5 outputs) and ignored the weight of the loss in the objective.
"""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, DiagGGN

pytestmark = pytest.mark.usefixtures("float64")


def problem(D=5):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, D)))
    x, y, t = torch.randn(8, 4), torch.randint(0, D, (8,)), torch.randn(8, D)
    return model, x, y, t


def diag(model, objective, ext=None):
    model.zero_grad()
    ext = ext or DiagGGN("empirical")
    with curvature(ext):
        objective().backward()
    return [p.diag_ggn.clone() for p in model.parameters()] if isinstance(ext, DiagGGN) else ext


def reference_diag(model, per_sample_loss, data, kappa):
    """``kappa sum_n (grad l_n)^2`` from torch.func per-sample gradients; ``data = (x, ...)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xn, *rest):
        out = torch.func.functional_call(model, p, (xn.unsqueeze(0),))
        return per_sample_loss(out, *(r.unsqueeze(0) for r in rest))

    grads = torch.func.vmap(torch.func.grad(f), in_dims=(None,) + (0,) * len(data))(params, *data)
    return [kappa * g.square().sum(0) for g in grads.values()]


def test_incompatible_normalizations_raise():
    """ce averages over N = 8 samples, mse over N * D = 40 numbers: no common kappa."""
    model, x, y, t = problem()
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    with pytest.raises(ValueError, match="(?s)empirical.*two extended losses"):
        diag(model, lambda: (lambda f: ce(f, y) + mse(f, t))(model(x)))
    with pytest.raises(ValueError, match="(?s)empirical.*two extended losses"):
        diag(model, lambda: (lambda f: mse(f, t) + ce(f, y))(model(x)))


def test_compatible_losses_are_order_independent_and_match_the_definition():
    """Both means over N samples (mse with one output), weighted 0.5 in the objective:
    kappa = 0.5 / N and the per-sample loss is ce_n + mse_n."""
    model, x, y, t = problem(D=1)
    model[2] = extend(nn.Linear(6, 3))
    y, t = torch.randint(0, 3, (8,)), torch.randn(8, 1)
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    w = torch.tensor([0.3, -0.2, 0.5])

    def mse_in(f):
        return f @ w[:, None]  # a one-output regression head on the same logits

    a = diag(model, lambda: (lambda f: 0.5 * (ce(f, y) + mse(mse_in(f), t)))(model(x)))
    b = diag(model, lambda: (lambda f: 0.5 * (mse(mse_in(f), t) + ce(f, y)))(model(x)))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)

    def per_sample(f, yn, tn):
        return nn.functional.cross_entropy(f, yn) + nn.functional.mse_loss(mse_in(f), tn)

    ref = reference_diag(model, per_sample, (x, y, t), kappa=0.5 / 8)
    for u, r in zip(a, ref):
        torch.testing.assert_close(u, r)


def test_loss_weight_enters_linearly_like_the_ggn():
    """``(c * loss).backward()``: the empirical Fisher scales by ``c`` (as type-2 does), not c^2."""
    model, x, y, t = problem()
    ce = extend(nn.CrossEntropyLoss())
    one = diag(model, lambda: ce(model(x), y))
    three = diag(model, lambda: 3.0 * ce(model(x), y))
    for u, v in zip(one, three):
        torch.testing.assert_close(v, 3.0 * u)


def test_type2_with_two_losses_needs_no_common_normalization():
    """Guard: the GGN of a sum of losses is the sum of GGNs; no error for type-2."""
    model, x, y, t = problem()
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    diag(model, lambda: (lambda f: ce(f, y) + mse(f, t))(model(x)), DiagGGN("type-2"))
    ext = KFAC("type-2")
    with curvature(ext):
        f = model(x)
        (ce(f, y) + mse(f, t)).backward()
    assert model[0].weight.kfac[0].shape == (6, 6)
