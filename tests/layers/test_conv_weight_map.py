"""Convolutions' GGN block products through the convolution kernels (``ConvAdapter.weight_map``)
against dense torch.func GGN blocks, for every padding / stride / dilation form and 1-3 d."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine.layers.conv import ConvAdapter
from curvlib.extensions import GGNMP
from tests.utils import dense_ggn, param_slices

pytestmark = pytest.mark.usefixtures("float64")

CONVS = {
    "2d-plain": (lambda: nn.Conv2d(2, 3, 3), (5, 2, 6, 6)),
    "2d-stride-pad": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 2, 7, 7)),
    "2d-dilation": (lambda: nn.Conv2d(2, 3, 2, dilation=2, padding=(1, 0)), (5, 2, 6, 5)),
    "2d-same-even": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (5, 2, 5, 5)),  # asymmetric
    "2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 2, 5, 5)),
    "1d-circular": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, padding_mode="circular"), (5, 2, 9)),
    "3d-replicate": (lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="replicate"), (4, 2, 3, 3, 3)),
}


def _net(name):
    make, shape = CONVS[name]
    torch.manual_seed(0)
    conv = make()
    with torch.no_grad():
        out = conv(torch.zeros(shape))
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out[0].numel(), 3)), shape


@pytest.mark.parametrize("name", list(CONVS))
def test_weight_map_is_the_convolution_and_its_transpose(name):
    net, shape = _net(name)
    conv = net[0]
    x = torch.randn(shape)
    wmap = ConvAdapter().weight_map(conv, x)
    V = torch.randn(3, *conv.weight.shape)
    y = wmap.forward(V)  # [N, B, C_out T]
    ref = torch.stack([conv._conv_forward(x, v, None) for v in V], 1).flatten(2)
    torch.testing.assert_close(y, ref)
    U = torch.randn_like(y)  # transpose: <forward(V), U> = <V, backward(U)> per column b
    torch.testing.assert_close((y * U).sum((0, 2)), (V * wmap.backward(U)).flatten(1).sum(1))


@pytest.mark.parametrize("mode", ["factored", "auto"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_block_products_through_kernels_equal_dense_ggn(name, mode):
    net, shape = _net(name)
    model, loss_fn = extend(net), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))
    ext = GGNMP(mode=mode)
    with curvature(ext):
        loss_fn(model(x), y).backward()
    assert ext._blocks[model[0]].map is not None and ext._blocks[model[0]].a is None
    G = dense_ggn(model, loss_fn, x, y)
    for sl, p in zip(param_slices(model), model.parameters()):
        for B in (1, 2, 1, 3):  # "auto" may switch to the materialised form on the way
            V = torch.randn(B, *p.shape)
            torch.testing.assert_close(p.ggnmp(V), (V.reshape(B, -1) @ G[sl, sl]).reshape(V.shape))
