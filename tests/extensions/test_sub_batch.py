"""SubBatch: the wrapped extension on a random fraction of the batch equals the extension run on
those samples alone (mean-normalized), inside the same backward."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import DiagGGN, KFAC, SubBatch

pytestmark = pytest.mark.usefixtures("float64")


def net():
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)))


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("make", [lambda ft: KFAC(ft), lambda ft: DiagGGN(ft)])
def test_sub_batch_equals_extension_on_the_samples(fisher_type, make):
    model, loss_fn = net(), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(10, 2, 4, 4), torch.randint(0, 4, (10,))
    ext = SubBatch(make(fisher_type), 0.4, generator=torch.Generator().manual_seed(1))
    with curvature(ext):
        loss_fn(model(x), y).backward()
    idx = ext.sampler.index
    assert idx.numel() == 4
    got = [getattr(p, ext.savefield) for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with curvature(make(fisher_type)):
        loss_fn(model(x[idx]), y[idx]).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, getattr(p, ext.savefield))
    model.zero_grad()
    loss_fn(model(x), y).backward()  # the gradient is still the whole batch's
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_fraction_must_be_in_unit_interval():
    with pytest.raises(ValueError, match="fraction"):
        SubBatch(KFAC(), 0.0)
