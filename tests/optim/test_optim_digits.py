"""Training: every curvature lowers the training loss of a small MLP on sklearn's digits faster
than SGD with momentum at its best learning rate of a small grid (short run in CI; the long run
is marked slow)."""
import os

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient

SLOW = os.environ.get("CURVLIB_SLOW") == "1"
CURVES = ["kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected", "diag", "exact-ng", "exact-ng-blocks", "two-level"]


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def train(make_opt, steps, batch=64, seed=0):
    X, Y = digits()
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), Y[idx])
        if isinstance(opt, NaturalGradient):
            with opt.capture():
                loss.backward()
        else:
            loss.backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(model(X), Y))


def best_sgd(steps):
    return min(
        train(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), steps)
        for lr in (0.03, 0.1, 0.3)
    )


@pytest.fixture(scope="module")
def sgd_short():
    return best_sgd(40)


#: per-curvature settings on top of lr 0.1, momentum 0.9, kl_clip 1e-2 and the mc Fisher, chosen
#: on a small grid (damping in {0.03, 0.1, 0.3, 1}, fisher_type, EMA, kl_clip; lr in {0.1, 0.3, 1}
#: changed little under kl_clip) so that each wins both at 40 and at 400 steps. "diag" wins the
#: short run only: at 400 steps no setting tried beat SGD (best 0.0145 against 0.0140).
SETTINGS = {
    "kfac": dict(damping=0.1),
    "kpsvd": dict(damping=0.1),
    "deflation": dict(damping=0.1),
    "lanczos": dict(damping=0.1),
    "kfac-corrected": dict(damping=0.1),
    "diag": dict(damping=0.1, fisher_type="type-2", ema_decay=0.0, kl_clip=0.1),
    "exact-ng": dict(damping=0.1, fisher_type="type-2"),
    "exact-ng-blocks": dict(damping=0.1, fisher_type="type-2"),
    "two-level": dict(damping=0.3, fisher_type="type-2"),
}


def make_ng(curvature):
    def make(model):
        kw = dict(lr=0.1, fisher_type="mc", momentum=0.9, kl_clip=1e-2, seed=0)
        kw.update(SETTINGS[curvature])
        return NaturalGradient(model.parameters(), curvature=curvature, **kw)

    return make


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("curvature", CURVES)
def test_beats_sgd_momentum_short(curvature, sgd_short):
    assert train(make_ng(curvature), 40) < sgd_short


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="long run: CURVLIB_SLOW=1")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "curvature",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="diagonal NG does not beat tuned SGD here"))
        if c == "diag"
        else c
        for c in CURVES
    ],
)
def test_beats_sgd_momentum_long(curvature):
    assert train(make_ng(curvature), 400) < best_sgd(400)
