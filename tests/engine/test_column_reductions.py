"""Column reductions (``Extension.column_reduction``): KFAC's ``G`` summed chunk by chunk at
the loss, the columns never stored; and the convolutions' ``A`` by a weight-gradient kernel.

References: the stored-columns path (the same KFAC with ``column_reduction`` switched off),
curvlinops' ``KFACLinearOperator`` and ``gram_rows`` of the unfolded patches. Chunk sizes that
split the columns unevenly (5 and 9 columns in chunks of 2).
"""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine import columns
from curvlib.engine.capture import LayerCapture
from curvlib.engine.factors import gram_rows
from curvlib.engine.layers import adapter_for
from curvlib.extensions import KFAC, BatchGrad
from tests.utils import curvlinops_blocks


class StoredKFAC(KFAC):
    """KFAC on the stored columns (the path before column reductions)."""

    def column_reduction(self, source):
        return None


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, stride=2),
        nn.GroupNorm(2, 4), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 2 * 2, 6),
    ).double()


def _factors(model, loss_fn, x, y, ext, chunk_bytes, monkeypatch):
    monkeypatch.setattr(columns, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(5)  # the same mc draws for every run
    loss = loss_fn(model(x), y)
    with curvature(ext):
        loss.backward()
    return {n: [f.clone() for f in p.kfac] for n, p in model.named_parameters()}


def _column_bytes(model, x):
    """Bytes of one column of the largest layer output (chunk sizes in columns)."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.numel())) for m in model]
    model(x)
    for h in hooks:
        h.remove()
    return max(outs) * 8


@pytest.mark.parametrize("fisher_type,mc_samples", [("type-2", 1), ("mc", 5)])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_reduced_equals_stored_columns_in_uneven_chunks(monkeypatch, fisher_type, mc_samples, kfac_approx):
    """type-2 (``C - 1 = 5`` columns) and mc with 5 samples, in chunks of 2 columns (2 + 2 + 1)
    and of 1: the factors equal those of the stored columns, to round-off."""
    x, y = torch.randn(7, 2, 8, 8, dtype=torch.float64), torch.randint(0, 6, (7,))
    model, loss_fn = extend(_cnn()), extend(nn.CrossEntropyLoss())
    col = _column_bytes(model, x)
    make = lambda cls: cls(fisher_type=fisher_type, mc_samples=mc_samples, kfac_approx=kfac_approx)
    ref = _factors(model, loss_fn, x, y, make(StoredKFAC), 2**40, monkeypatch)
    for chunk_bytes in (2 * col, col, 2**40):
        got = _factors(model, loss_fn, x, y, make(KFAC), chunk_bytes, monkeypatch)
        for n in ref:
            for a, b in zip(got[n], ref[n]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_reduced_equals_curvlinops_and_keeps_no_columns(monkeypatch, float64):
    """type-2 in chunks of 2 of 5 columns: ``kron(G, A)`` equals curvlinops' block; the captures
    KFAC sees hold the summed ``G`` and no type-2 columns."""
    x, y = torch.randn(7, 2, 8, 8, dtype=torch.float64), torch.randint(0, 6, (7,))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, stride=2),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 2 * 2, 6),
    ).double()
    ref = curvlinops_blocks(model, nn.CrossEntropyLoss(), x, y, fisher_type="type-2")
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    seen = []
    real = KFAC.compute

    def spy(self, capture):
        seen.append((capture.reduction(self, self.source) is not None, "type-2" in capture.raw))
        return real(self, capture)

    monkeypatch.setattr(KFAC, "compute", spy)
    monkeypatch.setattr(columns, "CHUNK_BYTES", 2 * _column_bytes(model, x))
    loss = loss_fn(model(x), y)
    with curvature(KFAC(fisher_type="type-2")):
        loss.backward()
    assert seen == [(True, False)] * 3
    got = []
    for p in model.parameters():
        got.append(torch.kron(*p.kfac) if p.ndim > 1 else p.kfac[0])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_not_reduced_when_another_extension_reads_the_columns(monkeypatch):
    """KFAC mc with BatchGrad (which needs no mc columns) reduces; KFAC(cross_layer=True) does
    not (it needs the columns): both equal the stored path."""
    x, y = torch.randn(7, 2, 8, 8, dtype=torch.float64), torch.randint(0, 6, (7,))
    model, loss_fn = extend(_cnn()), extend(nn.CrossEntropyLoss())
    model = model[:4].append(nn.Flatten()).append(nn.Linear(16, 6).double())
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    ref = _factors(model, loss_fn, x, y, StoredKFAC(fisher_type="mc", mc_samples=3), 2**40, monkeypatch)
    monkeypatch.setattr(columns, "CHUNK_BYTES", _column_bytes(model, x))
    for exts in ([KFAC(fisher_type="mc", mc_samples=3), BatchGrad()], [KFAC(fisher_type="mc", mc_samples=3, cross_layer=True)]):
        torch.manual_seed(5)
        loss = loss_fn(model(x), y)
        with curvature(*exts):
            loss.backward()
        for n, p in model.named_parameters():
            for a, b in zip(p.kfac, ref[n]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_shared_layer_keeps_its_columns(monkeypatch):
    """A layer called twice before one backward (its calls are combined before any reduction)
    next to single-call layers that reduce: equal to the stored path, in uneven chunks."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(4, 5)
            self.shared = nn.Linear(5, 5)
            self.norm = nn.LayerNorm(5)
            self.out = nn.Linear(5, 6)

        def forward(self, x):
            h = torch.tanh(self.shared(torch.tanh(self.shared(self.inp(x)))))
            return self.out(self.norm(h))

    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 6, (7,))
    model, loss_fn = extend(Twice().double()), extend(nn.CrossEntropyLoss())
    ref = _factors(model, loss_fn, x, y, StoredKFAC(fisher_type="type-2"), 2**40, monkeypatch)
    got = _factors(model, loss_fn, x, y, KFAC(fisher_type="type-2"), 2 * 7 * 6 * 8, monkeypatch)
    for n in ref:
        for a, b in zip(got[n], ref[n]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 7, 6)),
        (lambda: nn.Conv2d(3, 4, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2)), (5, 3, 7, 8)),
        (lambda: nn.Conv2d(3, 4, 2, padding="same"), (5, 3, 6, 6)),  # asymmetric padding
        (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (5, 3, 6, 6)),
        (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), (5, 3, 6, 6)),
        (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (5, 3, 11)),
        (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)), (4, 2, 4, 5, 3)),
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 7, 6)),  # unbatched
    ],
)
def test_conv_act_gram_equals_gram_of_patches(layer, shape):
    """The weight-gradient kernel's ``sum_{n,t} a a^T`` equals the Gram matrix of the patches."""
    torch.manual_seed(0)
    lay = layer().double()
    x = torch.randn(*shape, dtype=torch.float64)
    cap = LayerCapture(lay, adapter_for(lay), x, {}, 1.0)
    torch.testing.assert_close(cap.act_gram(), gram_rows(cap.act()), rtol=1e-12, atol=1e-12)
    assert adapter_for(lay).act_gram(lay, x, cap.act) is not None


def test_conv_act_gram_refuses_groups():
    lay = nn.Conv2d(4, 4, 3, groups=2)
    x = torch.randn(2, 4, 5, 5)
    assert adapter_for(lay).act_gram(lay, x, lambda: adapter_for(lay).activations(lay, x)) is None


@pytest.mark.parametrize(
    "N, C, L, k, P",
    [
        (3, 2, (7, 6), (3, 3), (1, 1)),
        (2, 3, (9,), (5,), (2,)),
        (2, 2, (5, 4, 6), (3, 2, 3), (1, 0, 2)),  # mixed kernels and paddings, 3-d
        (2, 3, (6, 6), (3, 3), (0, 0)),  # no padding: every offset misses border rows
        (2, 2, (4, 4), (3, 3), (3, 3)),  # padding wider than the kernel: no border terms
        (2, 2, (3, 7), (5, 3), (1, 1)),  # kernel as tall as the input
    ],
)
def test_shift_gram_equals_gram_of_patches(N, C, L, k, P):
    """The shift-correlation Gram (inclusion-exclusion over the border rows) equals the Gram of
    the unfolded patches, and is exactly symmetric."""
    from curvlib.engine.layers.conv_gram import shift_gram
    from curvlib.engine.unfold import unfold

    torch.manual_seed(0)
    x = torch.randn(N, C, *L, dtype=torch.float64)
    pad = tuple(v for Pi in reversed(P) for v in (Pi, Pi))
    a = unfold(x, k, [1] * len(k), [1] * len(k), pad)
    A = shift_gram(x, k, P)
    torch.testing.assert_close(A, gram_rows(a), rtol=1e-12, atol=1e-12)
    assert torch.equal(A, A.T)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.Conv2d(8, 4, 3, padding=1), (3, 8, 9, 7)),
        (lambda: nn.Conv3d(8, 2, 3, padding=1), (2, 8, 6, 6, 6)),
        (lambda: nn.Conv1d(9, 4, 5, padding=2), (3, 9, 20)),
        (lambda: nn.Conv2d(8, 4, 3, padding=1), (8, 9, 7)),  # unbatched
    ],
)
def test_conv_act_gram_shift_path_forms_no_patches(layer, shape):
    """Wide stride-1 convolutions take the shift correlations: the same Gram, the patches never
    formed (``act`` is not called), and ``act_rows`` known without them."""
    torch.manual_seed(0)
    lay = layer().double()
    x = torch.randn(*shape, dtype=torch.float64)
    cap = LayerCapture(lay, adapter_for(lay), x, {}, 1.0)

    def refuse():
        raise AssertionError("patches formed")

    G = adapter_for(lay).act_gram(lay, x, refuse)
    assert cap.act_rows() == cap.act().shape[:-1].numel()
    torch.testing.assert_close(G, gram_rows(cap.act()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spatial,plain", [(1, True), (2, True), (8, False)])
def test_conv_act_gram_takes_the_plain_gram_for_few_patches(spatial, plain):
    """Deep convolutions on small maps (resnet18's layer4 at 32x32: 32 patches of 4608 features)
    take the plain Gram of the patches, not the weight-gradient kernel (2-3x slower there: KFAC mc
    on resnet18 was 1.6x curvlinops); the value is the Gram of the patches either way."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, padding=1, bias=False).double()
    x = torch.randn(4, 32, spatial, spatial, dtype=torch.float64)
    ad = adapter_for(conv)
    a = ad.activations(conv, x)
    G = ad.act_gram(conv, x, lambda: a)
    assert (G is None) == plain
    cap = LayerCapture(conv, ad, x, {}, 1.0)
    torch.testing.assert_close(cap.act_gram(), gram_rows(a))
