"""An empty batch gets a clear ValueError naming the module; an unbatched convolution input
``[C, *S]`` (which torch accepts) is captured exactly as a batch of one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad, ExactBlockFisher

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize(
    "loss_fn, fisher_type, match",
    [
        (nn.CrossEntropyLoss(), "type-2", "CrossEntropyLoss.*empty input"),
        (nn.CrossEntropyLoss(reduction="sum"), "mc", "CrossEntropyLoss.*empty input"),
        (nn.MSELoss(reduction="sum"), "empirical", "Linear.*empty input"),  # loss not extended
    ],
)
def test_empty_batch_is_refused_clearly(loss_fn, fisher_type, match):
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    if fisher_type != "empirical":
        loss_fn = extend(loss_fn)
    x = torch.randn(0, 4)
    y = torch.randint(0, 3, (0,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(0, 3)
    loss = loss_fn(model(x), y)
    with pytest.raises(ValueError, match=match):
        with curvature(KFAC(fisher_type=fisher_type)):
            loss.backward()


def test_empty_conv_batch_is_refused_clearly():
    model = extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3)))
    loss = nn.CrossEntropyLoss(reduction="sum")(model(torch.randn(0, 2, 4, 4)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="Linear.*empty input"):
        with curvature(BatchGrad()):
            loss.backward()


CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 2, padding=1), (2, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), (2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2), (2, 3, 3, 3)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), (2, 3, 3)),
}


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_unbatched_conv_input_is_a_batch_of_one(name, fisher_type):
    make, shape = CONVS[name]
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(*shape)
    n_out = conv(x).numel()
    model = extend(nn.Sequential(conv, nn.Flatten(-len(shape)), nn.Linear(n_out, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    results = []
    for xb, y in ((x, torch.tensor(1)), (x[None], torch.tensor([1]))):  # unbatched, batch of one
        model.zero_grad()
        loss = loss_fn(model(xb), y)
        torch.manual_seed(1)
        with curvature(KFAC(fisher_type=fisher_type), BatchGrad(), ExactBlockFisher(fisher_type=fisher_type)):
            loss.backward()
        results.append([t for p in conv.parameters() for t in (*p.kfac, p.grad_batch, p.block_fisher)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    w = conv.weight
    torch.testing.assert_close(w.grad_batch[0], w.grad)  # BatchGrad's scaling: sums to p.grad
