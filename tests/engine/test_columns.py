"""Column back-propagation: chunks of columns, canonical type-2 sources.

References: the same quantities computed with all columns in one batched backward (the
chunking must not change them), each extension in its own context (sharing columns must
not change them), and the dense GGN diagonal from ``torch.func``.
"""
import pytest
import torch
from torch import nn

import curvlib
from curvlib import curvature, extend
from curvlib.engine import columns, loss_columns
from curvlib.extensions import GGNMP, KFAC, DiagGGN
from tests.utils import dense_ggn


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    ).double()


def _seq_model():
    """Output ``[N, C, L]``: ``L = 3`` positions per sample for CrossEntropyLoss."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Conv1d(4, 3, 2)).double()


def _run(model, loss_fn, x, y, *exts):
    loss = loss_fn(model(x), y)
    with curvature(*exts):
        loss.backward()
    return {n: {k: getattr(p, k) for k in ("kfac", "diag_ggn") if hasattr(p, k)} for n, p in model.named_parameters()}


def _count_columns(monkeypatch):
    seen = []
    real = loss_columns.backprop_columns

    def spy(f, edges, V, roots, shapes):
        seen.append(V.shape[0])
        return real(f, edges, V, roots, shapes)

    monkeypatch.setattr(loss_columns, "backprop_columns", spy)
    return seen


def test_chunked_columns_equal_one_batch(monkeypatch):
    """With a chunk of one or two columns (a CNN whose max-pool has no batching rule) the
    factors and products equal those of one batched backward of all columns."""
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))

    def results(chunk_bytes):
        monkeypatch.setattr(columns, "CHUNK_BYTES", chunk_bytes)
        model, loss_fn = extend(_cnn()), extend(nn.CrossEntropyLoss())
        ggnmp = GGNMP()
        loss = loss_fn(model(x), y)
        with curvature(KFAC(fisher_type="type-2"), ggnmp):
            loss.backward()
        F = ggnmp.operator()
        v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3)) for p in F.params]
        return [p.kfac for p in model.parameters()], F(v)

    one_batch = results(2**40)
    for chunk_bytes in (1, 6 * 3 * 6 * 6 * 8 * 2):  # one column, two columns per chunk
        assert columns.column_chunk(torch.zeros(4, 6, 5, dtype=torch.float64), [(6, 3, 6, 6)]) >= 1
        kfac, Fv = results(chunk_bytes)
        for a, b in zip(kfac, one_batch[0]):
            for fa, fb in zip(a, b):
                torch.testing.assert_close(fa, fb, rtol=1e-12, atol=1e-14)
        for a, b in zip(Fv, one_batch[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_column_chunk_size():
    V = torch.zeros(9, 64, 10)
    mid = [(64, 16, 14, 14)]  # 0.8 MiB per float32 column: chunks of CHUNK_BYTES
    assert columns.column_chunk(V, mid) == columns.CHUNK_BYTES // (64 * 16 * 14 * 14 * 4) > 1
    mlp = [(64, 512)]  # 128 KiB per column
    assert columns.column_chunk(V, mlp) == columns.CHUNK_BYTES // (64 * 512 * 4)
    assert columns.column_chunk(V, [(64, 10)]) >= 9
    # columns of 1 MiB or more (the CG-Newton example's first convolution: 1.5 MB): one at a time
    assert columns.column_chunk(V, [(64, 10, 24, 24)]) == 1
    assert columns.column_chunk(V, [(64, 16, 28, 28)]) == 1
    assert columns.column_chunk(V, [(10**9,)]) == 1


def test_kfac_and_diag_ggn_share_columns(monkeypatch):
    """KFAC and DiagGGN, both type-2, on an ``[N, C]`` output: the ``C - 1`` columns are
    back-propagated once (before: twice), with the results of separate contexts."""
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    model, loss_fn = extend(_cnn()), extend(nn.CrossEntropyLoss())
    alone_kfac = _run(model, loss_fn, x, y, KFAC(fisher_type="type-2"))
    alone_diag = _run(model, loss_fn, x, y, DiagGGN())
    seen = _count_columns(monkeypatch)
    both = _run(model, loss_fn, x, y, KFAC(fisher_type="type-2"), DiagGGN())
    assert seen == [4]  # C - 1 = 4 columns, once
    for n in both:
        for a, b in zip(both[n]["kfac"], alone_kfac[n]["kfac"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(both[n]["diag_ggn"], alone_diag[n]["diag_ggn"], rtol=1e-12, atol=1e-14)


def test_shared_type2_summed_from_exact_columns(monkeypatch):
    """Output with ``L`` positions: KFAC's shared columns (``C``) are the sums of the exact
    ones (``C L``) over positions, so only the ``C L`` exact columns are back-propagated;
    KFAC equals KFAC alone and DiagGGN equals the dense GGN diagonal."""
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 3))
    model, loss_fn = extend(_seq_model()), extend(nn.CrossEntropyLoss())
    alone = _run(model, loss_fn, x, y, KFAC(fisher_type="type-2"))
    seen = _count_columns(monkeypatch)
    both = _run(model, loss_fn, x, y, KFAC(fisher_type="type-2"), DiagGGN())
    assert seen == [3 * 3]  # C L exact columns only (before: C + C L)
    for n in both:
        for a, b in zip(both[n]["kfac"], alone[n]["kfac"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    G = dense_ggn(model, nn.CrossEntropyLoss(), x, y).diagonal()
    diag = torch.cat([both[n]["diag_ggn"].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(diag, G, rtol=1e-10, atol=1e-12)


def test_chunked_kfac_sums_in_place_once_for_a_shared_G(monkeypatch):
    """KFAC alone reduces the columns chunk by chunk (``G`` summed in place): the weight and
    the bias share one ``G`` tensor, which must be added to once per chunk, not twice; also
    with chunks of unequal sizes rebalanced (5 columns in chunks of at most 2: 2, 2, 1)."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 6, (7,))
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6)).double()

    def results(chunk_bytes):
        monkeypatch.setattr(columns, "CHUNK_BYTES", chunk_bytes)
        model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6)).double())
        model.load_state_dict(net.state_dict())
        out = _run(model, extend(nn.CrossEntropyLoss()), x, y, KFAC(fisher_type="type-2"))
        return {n: v["kfac"] for n, v in out.items()}

    one_batch = results(2**40)
    assert one_batch["2.bias"][0] is not None
    for chunk_bytes in (1, 7 * 6 * 8 * 2, 7 * 6 * 8 * 3):  # 1, 2 and 3 (-> 3, 2) columns per chunk
        chunked = results(chunk_bytes)
        for n, fs in one_batch.items():
            for fa, fb in zip(chunked[n], fs):
                torch.testing.assert_close(fa, fb, rtol=1e-12, atol=1e-14)


def test_add_into_keeps_shared_and_separate_accumulators_apart():
    G, H = torch.ones(2, 2), torch.full((2, 2), 2.0)
    acc = {"weight": G, "bias": G, "other": H}
    g = torch.ones(2, 2)
    loss_columns.add_into(acc, {"weight": g, "bias": g, "other": torch.ones(2, 2)})
    assert acc["weight"] is acc["bias"]
    torch.testing.assert_close(acc["weight"], torch.full((2, 2), 2.0))
    torch.testing.assert_close(acc["other"], torch.full((2, 2), 3.0))
    acc = {"weight": G, "bias": G}  # one accumulator, two different addends: out of place
    loss_columns.add_into(acc, {"weight": torch.ones(2, 2), "bias": torch.zeros(2, 2)})
    torch.testing.assert_close(acc["weight"], torch.full((2, 2), 3.0))
    torch.testing.assert_close(acc["bias"], torch.full((2, 2), 2.0))
