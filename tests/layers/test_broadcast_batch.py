"""A layer run on a batch of 1 (or without the batch dimension) whose output is broadcast over the
N samples of the loss (position embeddings; curvlib/engine/operations.py, item 3 of issue 21).

Handled: the output broadcast directly by an elementwise operation against the batch gets exact
per-sample quantities, equal to those of the same model given the input expanded to the batch.
Not handled (the output used otherwise): a clear error at the curvature backward naming the
layer, never a result summed over the samples (before: ``grad_batch [1, T, D]``, silently).
"""

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad
from tests.utils import assert_batch_grad_and_diag_ggn

N, T, D, V = 4, 5, 3, 6


pytestmark = pytest.mark.usefixtures("float64")


class Positions(nn.Module):
    """``tok(ids) + pos(positions)`` then a Linear head; ``mode`` says how the positions come:
    ``"batch1"`` ``[1, T]`` (HF), ``"vector"`` ``arange(T)`` (nanoGPT), ``"expanded"`` ``[N, T]``
    (the reference), ``"query"`` a Linear on a batch-1 buffer."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.proj = nn.Linear(D, D) if mode == "query" else None
        self.head = nn.Linear(D, V)
        self.register_buffer("queries", torch.randn(1, T, D))

    def forward(self, ids):
        h = self.tok(ids)
        if self.mode == "vector":
            h = h + self.pos(torch.arange(T))
        elif self.mode == "expanded":
            h = h + self.pos(torch.arange(T).expand(ids.shape[0], T))
        else:
            h = h + self.pos(torch.arange(T).unsqueeze(0))
        if self.mode == "query":
            h = self.proj(self.queries) * h
        return self.head(torch.tanh(h)).transpose(1, 2)  # [N, V, T]


def data():
    return torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))


@pytest.mark.parametrize("mode", ["batch1", "vector", "query"])
def test_exact_per_sample_quantities(mode):
    assert_batch_grad_and_diag_ggn(Positions(mode), nn.CrossEntropyLoss(), *data())


@pytest.mark.parametrize("mode", ["batch1", "vector"])
@pytest.mark.parametrize("fisher_type,approx", [("type-2", "expand"), ("empirical", "expand"), ("mc", "expand")])
def test_kfac_equals_the_expanded_positions(mode, fisher_type, approx):
    """KFAC of the broadcast position table = KFAC with the positions expanded to the batch (the
    samples' rows as positions: ``A`` the 1-D position frequencies, ``G`` over all ``N T`` rows)."""
    model, ref = Positions(mode), Positions("expanded")
    ref.load_state_dict(model.state_dict())
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    for m in (extend(model), extend(ref)):
        torch.manual_seed(1)
        loss = loss_fn(m(x), y)
        with curvature(KFAC(fisher_type=fisher_type, kfac_approx=approx)):
            loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        for a, b in zip(p.kfac, q.kfac):
            torch.testing.assert_close(a, b, msg=n)


class Unhandled(Positions):
    """The batch-1 output used before the broadcast (scaled) or besides it (its mean)."""

    def __init__(self, how: str):
        super().__init__("batch1")
        self.how = how

    def forward(self, ids):
        p = self.pos(torch.arange(T).unsqueeze(0))
        if self.how == "before":
            h = self.tok(ids) + 2.0 * p
        else:
            h = self.tok(ids) + p + p.mean()
        return self.head(torch.tanh(h)).transpose(1, 2)


@pytest.mark.parametrize("how", ["before", "besides"])
def test_a_broadcast_curvlib_cannot_follow_raises_naming_the_layer(how):
    model = extend(Unhandled(how))
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match=r"Embedding\(5, 3\).*(batch of 1|broadcast over the 4 samples)"):
        with curvature(BatchGrad()):
            loss_fn(model(x), y).backward()
    # without curvature the backward is the plain one
    loss_fn(model(x), y).backward()


def test_a_batch_of_one_is_not_a_broadcast():
    model = extend(Positions("batch1"))
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(BatchGrad(), KFAC(fisher_type="type-2")):
        loss_fn(model(x[:1]), y[:1]).backward()
    assert model.pos.weight.grad_batch.shape == (1, T, D)
    torch.testing.assert_close(model.pos.weight.grad_batch[0], model.pos.weight.grad)
