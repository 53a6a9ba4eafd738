"""Gradient accumulation: several backwards in one curvature context equal one backward on the
concatenated batch, for every extension (issue 7, item 2).

Micro-batch losses are scaled as for gradient accumulation: ``loss(x_i) * len(x_i) / N`` with
``reduction="mean"``, unscaled with ``"sum"``. Micro-batches of unequal sizes (3 + 4), so that
a mean over samples (KFAC's ``A``) must be weighted by counts.
"""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KPSVD,
    BatchGrad,
    CrossKFAC,
    DiagGGN,
    ExactBlockFisher,
    GradFactors,
    KFACCorrected,
)

pytestmark = pytest.mark.usefixtures("float64")

SPLITS = (3, 4)


def problem(net="mlp", loss="ce", reduction="mean"):
    torch.manual_seed(0)
    N = sum(SPLITS)
    if net == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(N, 4)
    else:  # T > 1: a convolution (expand vs reduce, per-position sums)
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
        x = torch.randn(N, 2, 3, 3)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, 3, (N,))
    else:
        loss_fn, y = nn.MSELoss(reduction=reduction), torch.randn(N, 3)
    return extend(model), extend(loss_fn), x, y


def single(model, loss_fn, x, y, ext):
    model.zero_grad()
    with curvature(ext):
        loss_fn(model(x), y).backward()
    return snapshot(model, ext)


def accumulated(model, loss_fn, x, y, ext):
    model.zero_grad()
    N = x.shape[0]
    with curvature(ext):
        for xi, yi in zip(x.split(SPLITS), y.split(SPLITS)):
            scale = len(xi) / N if loss_fn.reduction == "mean" else 1.0
            (loss_fn(model(xi), yi) * scale).backward()
    return snapshot(model, ext)


def snapshot(model, ext):
    out = {"grad": [p.grad.clone() for p in model.parameters()]}
    field = ext.savefield
    if isinstance(ext, GGNMP):
        V = [torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
        out[field] = [p.ggnmp(v) for p, v in zip(model.parameters(), V)]
        out["operator"] = ext.operator().to_dense()
    elif isinstance(ext, (KPSVD, KFACCorrected)):
        out[field] = [sum(torch.kron(*t) if len(t) == 2 else t[0] for t in getattr(p, field)) for p in model.parameters()]
    elif isinstance(ext, CrossKFAC):
        out[field] = dict(ext.cross_factors)
    elif isinstance(ext, KFAC) and ext.cross is not None:
        out[field] = [getattr(p, field) for p in model.parameters()]
        out["cross"] = dict(ext.cross.cross_factors)
    else:
        out[field] = [getattr(p, field) for p in model.parameters()]
    return out


def assert_same(acc, ref, **tol):
    assert acc.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(acc[key], ref[key], msg=lambda m: f"{key}: {m}", **tol)


EXTS = {
    "BatchGrad": lambda ft: BatchGrad(),
    "DiagGGN": lambda ft: DiagGGN(ft),
    "ExactBlockFisher": lambda ft: ExactBlockFisher(ft),
    "GradFactors": lambda ft: GradFactors(ft),
    "KFAC-expand": lambda ft: KFAC(ft),
    "KFAC-reduce": lambda ft: KFAC(ft, kfac_approx="reduce"),
    "KFAC-cross": lambda ft: KFAC(ft, kfac_approx="reduce", cross_layer=True),
    "CrossKFAC": lambda ft: CrossKFAC(ft),
    "GGNMP": lambda ft: GGNMP(ft),
    "KPSVD": lambda ft: KPSVD(ft, method="lanczos", warm_start=False),
    "KFACCorrected": lambda ft: KFACCorrected(ft, warm_start=False),
}


@pytest.mark.parametrize("name", list(EXTS))
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("net,loss,reduction", [("mlp", "ce", "mean"), ("mlp", "mse", "sum"), ("cnn", "ce", "sum"), ("cnn", "mse", "mean")])
def test_accumulated_equals_one_backward_on_concatenated_batch(name, fisher_type, net, loss, reduction):
    if name == "BatchGrad" and fisher_type != "type-2":
        pytest.skip("BatchGrad has no fisher_type")
    model, loss_fn, x, y = problem(net, loss, reduction)
    ref = single(model, loss_fn, x, y, EXTS[name](fisher_type))
    acc = accumulated(model, loss_fn, x, y, EXTS[name](fisher_type))
    tol = dict(rtol=1e-6, atol=1e-8) if name in ("KPSVD", "KFACCorrected") else {}
    assert_same(acc, ref, **tol)


def test_batch_grad_sums_to_accumulated_grad():
    """The issue's symptom: grad_batch.sum(0) was the last micro-batch's gradient only."""
    model, loss_fn, x, y = problem()
    accumulated(model, loss_fn, x, y, BatchGrad())
    for p in model.parameters():
        assert p.grad_batch.shape == (sum(SPLITS), *p.shape)
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)


@pytest.mark.parametrize("make", [lambda: DiagGGN("mc", mc_samples=2), lambda: KFAC("mc", mc_samples=2)])
def test_mc_accumulates_the_draws_of_every_micro_batch(make):
    """mc draws differ between one backward and micro-batches, so the reference is the
    micro-batches in separate contexts with the same random stream, combined by hand."""
    model, loss_fn, x, y = problem()
    N = x.shape[0]
    torch.manual_seed(1)
    parts = []
    for xi, yi in zip(x.split(SPLITS), y.split(SPLITS)):
        with curvature(make()):
            (loss_fn(model(xi), yi) * len(xi) / N).backward()
        parts.append([getattr(p, make().savefield) for p in model.parameters()])
    torch.manual_seed(1)
    ext = make()
    acc = accumulated(model, loss_fn, x, y, ext)[ext.savefield]
    full = single(model, loss_fn, x, y, make())[ext.savefield]
    for i, p in enumerate(model.parameters()):
        if isinstance(ext, DiagGGN):
            torch.testing.assert_close(acc[i], parts[0][i] + parts[1][i])
        else:
            torch.testing.assert_close(acc[i][0], parts[0][i][0] + parts[1][i][0])  # G: a sum
            if p.ndim == 2:  # A: the full batch's, whatever the draws
                torch.testing.assert_close(acc[i][1], full[i][1])


@pytest.mark.parametrize("loss,reduction", [("ce", "mean"), ("mse", "sum")])
def test_hmp_products_and_operator_sum_over_backwards(loss, reduction):
    model, loss_fn, x, y = problem("mlp", loss, reduction)
    refs = []
    for run in (single, accumulated):
        ext = HMP()
        run(model, loss_fn, x, y, ext)
        V = [torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
        refs.append(([p.hmp(v) for p, v in zip(model.parameters(), V)], ext.operator().to_dense()))
    torch.testing.assert_close(refs[1], refs[0])


class _LastOnly(DiagGGN):
    accumulation = None  # an extension that cannot accumulate


def test_extension_that_cannot_accumulate_raises_on_second_backward():
    model, loss_fn, x, y = problem()
    with pytest.raises(RuntimeError, match="_LastOnly cannot accumulate over several backward"):
        accumulated(model, loss_fn, x, y, _LastOnly())


def test_empirical_without_extended_loss_raises_on_second_backward():
    torch.manual_seed(0)
    model = extend(nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss()  # not extended: the micro-batch scaling is unknown
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    with pytest.raises(RuntimeError, match="extended loss"):
        with curvature(KFAC("empirical")):
            for xi, yi in zip(x.split(SPLITS), y.split(SPLITS)):
                (loss_fn(model(xi), yi) * len(xi) / 7).backward()
