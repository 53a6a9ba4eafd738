"""Captured per-sample factorisations reproduce per-sample gradients and the exact GGN."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine.capture import LayerCapture
from curvlib.extensions.base import Extension
from tests.utils import dense_ggn, param_slices, per_sample_grads


class Keep(Extension):
    """Test extension: keeps per-sample gradients of a source on the parameters."""

    savefield = "psg"

    def __init__(self, source):
        super().__init__("empirical")
        self._src = source

    @property
    def source(self):
        return self._src

    def compute(self, capture: LayerCapture):
        return {n: capture.per_sample_grads(n, self._src) for n in capture.params}


def nets():
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (6, 5)),
        "seq": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Flatten()), (6, 2, 5)),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 9)),
        "conv2d_same": (lambda: nn.Sequential(nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="reflect"), nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 5, 4)),
        "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=(1, 0, 1)), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 3, 4, 3)),
        "convT1d": (lambda: nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 4)),
        "convT2d": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 3, 3)),
        "convT3d": (lambda: nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (6, 2, 2, 2, 2)),
    }


@pytest.mark.parametrize("name", list(nets()))
def test_per_sample_gradients_match_torch_func(name):
    torch.set_default_dtype(torch.float64)
    try:
        make, shape = nets()[name]
        model = make()
        x = torch.randn(*shape)
        model(x)  # materialise lazy layers
        y = torch.randint(0, 3, (shape[0],))
        extend(model)
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        loss = loss_fn(model(x), y)
        with curvature(Keep("grad")):
            loss.backward()
        ref = per_sample_grads(model, loss_fn, x, y)
        for (pname, p) in model.named_parameters():
            torch.testing.assert_close(p.psg[0], ref[pname], msg=f"{name}: {pname}")
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", ["mlp", "conv2d_same", "convT2d"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_exact_factors_give_dense_ggn_blocks(name, reduction):
    torch.set_default_dtype(torch.float64)
    try:
        make, shape = nets()[name]
        model = make()
        x = torch.randn(*shape)
        model(x)
        y = torch.randint(0, 3, (shape[0],))
        extend(model)
        loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
        loss = loss_fn(model(x), y)
        with curvature(Keep("type-2-exact")):
            loss.backward()
        G = dense_ggn(model, loss_fn, x, y)
        for sl, p in zip(param_slices(model), model.parameters()):
            X = p.psg.reshape(-1, p.numel())
            torch.testing.assert_close(X.T @ X, G[sl, sl])
    finally:
        torch.set_default_dtype(torch.float32)
