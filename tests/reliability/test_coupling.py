"""Samples coupled by the forward (BatchNorm in training mode): exact and per-sample quantities
raise, KFAC warns once, eval mode is exact and silent (issue 7, item 1)."""
import warnings

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
from tests.zoo import TinyResNet
from tests.utils import dense_ggn, param_slices

pytestmark = pytest.mark.usefixtures("float64")


def linear_bn(affine=True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm's parameters have no adapter
        model = extend(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=affine), nn.Tanh(), nn.Linear(5, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    return model, loss_fn, torch.randn(8, 4), torch.randint(0, 3, (8,))


def backward(model, loss_fn, x, y, *exts):
    with curvature(*exts):
        loss_fn(model(x), y).backward()


def coupling_warnings(record):
    return [w for w in record if "couple" in str(w.message)]


@pytest.mark.parametrize("affine", [True, False])
def test_diag_ggn_type2_before_batchnorm_raises(affine):
    model, loss_fn, x, y = linear_bn(affine)
    with pytest.raises(RuntimeError, match=r"(?s)DiagGGN.*'1' \(BatchNorm1d\).*model\.eval\(\)"):
        backward(model, loss_fn, x, y, DiagGGN("type-2"))


@pytest.mark.parametrize(
    "ext",
    [
        ExactBlockFisher("type-2"),
        BatchGrad(),
        GradFactors("empirical"),
        GGNMP("type-2"),
        KPSVD("type-2"),
        KFACCorrected("type-2"),
        CrossKFAC("type-2"),
        KFAC("type-2", cross_layer=True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_exact_and_per_sample_extensions_raise(ext):
    model, loss_fn, x, y = linear_bn()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d.*model\.eval\(\)"):
        backward(model, loss_fn, x, y, ext)


def test_kfac_warns_once_per_model():
    model, loss_fn, x, y = linear_bn(affine=False)
    with pytest.warns(UserWarning, match=r"KFAC treats the samples as independent.*BatchNorm1d") as rec:
        backward(model, loss_fn, x, y, KFAC("type-2"))
    assert len(coupling_warnings(rec)) == 1
    assert model[0].weight.kfac[0].shape == (5, 5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        backward(model, loss_fn, x, y, KFAC("empirical"))
    assert coupling_warnings(rec) == []


def test_eval_mode_is_exact_and_silent():
    """Guard: BatchNorm with running statistics is per-sample (an affine map): no error, no
    warning, and the exact GGN diagonal matches the dense one."""
    model, loss_fn, x, y = linear_bn(affine=False)
    model.eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        backward(model, loss_fn, x, y, DiagGGN("type-2"), KFAC("type-2"))
    assert coupling_warnings(rec) == []
    diag = dense_ggn(model, loss_fn, x, y).diagonal()
    for sl, p in zip(param_slices(model), model.parameters()):
        torch.testing.assert_close(p.diag_ggn.flatten(), diag[sl])


def test_batchnorm_without_running_stats_couples_in_eval_mode():
    """``track_running_stats=False`` uses batch statistics in eval mode too."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False, track_running_stats=False), nn.Linear(5, 3)))
    model.eval()
    with pytest.raises(RuntimeError, match="BatchNorm1d"):
        backward(model, extend(nn.CrossEntropyLoss()), torch.randn(6, 4), torch.randint(0, 3, (6,)), DiagGGN())


def test_hmp_is_exact_with_coupling():
    """HMP re-runs the whole objective, so it needs no independent samples (no error)."""
    model, loss_fn, x, y = linear_bn(affine=False)
    ext = HMP()
    backward(model, loss_fn, x, y, ext)
    W = model[0].weight
    V = torch.randn(1, *W.shape)
    params = dict(model.named_parameters())

    def f(w):
        bufs = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm updates them
        p = dict(params, **bufs, **{"0.weight": w})
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    H = torch.func.hessian(f)(W.detach()).reshape(W.numel(), W.numel())
    torch.testing.assert_close(W.hmp(V).flatten(), H @ V.flatten())


def test_resnet_block_train_mode():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = extend(TinyResNet())
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match=r"'bn' \(BatchNorm2d\)"):
        backward(model, loss_fn, x, y, ExactBlockFisher("type-2"))
    with pytest.warns(UserWarning, match="couples"):
        backward(model, loss_fn, x, y, KFAC("mc"))


def test_resnet_block_eval_mode_ggn_operator_is_exact():
    torch.manual_seed(0)
    model = extend(TinyResNet(affine=False)).eval()
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    ext = GGNMP("type-2")
    backward(model, loss_fn, x, y, ext)
    torch.testing.assert_close(ext.operator().to_dense(), dense_ggn(model, loss_fn, x, y))


class BatchCenter(nn.Module):
    """A coupling module the engine does not know: centres over the batch."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def centred(eval_mode=False):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), BatchCenter(), nn.Tanh(), nn.Linear(5, 3)))
    model.train(not eval_mode)
    return model, extend(nn.CrossEntropyLoss()), torch.randn(6, 4), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("make", [lambda: DiagGGN("type-2"), lambda: BatchGrad()], ids=["DiagGGN", "BatchGrad"])
def test_probe_finds_unknown_coupling_on_first_capture(make, eval_mode):
    """The generic probe (one extra cotangent on sample 0, first capture of a model per mode)
    names the layer upstream of the coupling; the layer after it is fine."""
    model, loss_fn, x, y = centred(eval_mode)
    with pytest.raises(RuntimeError, match=r"(?s)downstream of the layer '0' \(Linear\)"):
        backward(model, loss_fn, x, y, make())


def test_probe_kfac_warns_and_results_unchanged():
    model, loss_fn, x, y = centred()
    with pytest.warns(UserWarning, match="downstream of the layer '0'"):
        backward(model, loss_fn, x, y, KFAC("type-2"))
    first = [f.clone() for f in model[0].weight.kfac]
    backward(model, loss_fn, x, y, KFAC("type-2"))  # no probe on later captures
    for a, b in zip(first, model[0].weight.kfac):
        torch.testing.assert_close(a, b)


def test_probe_silent_on_independent_samples():
    """Guard: no leak, no warning for a per-sample model (the probe is exact zeros there)."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        backward(model, extend(nn.CrossEntropyLoss()), torch.randn(5, 2, 3, 3), torch.randint(0, 3, (5,)), DiagGGN(), BatchGrad())
    assert coupling_warnings(rec) == []


def test_registered_coupling_type_raises_by_module_scan():
    """``register_coupling``: a declared type is reported by name (no probe needed)."""
    from curvlib.engine import coupling, register_coupling

    class Declared(nn.Identity):
        pass

    register_coupling(Declared)
    try:
        torch.manual_seed(0)
        model = extend(nn.Sequential(nn.Linear(4, 3), Declared()))
        with pytest.raises(RuntimeError, match=r"'1' \(Declared\)"):
            backward(model, extend(nn.CrossEntropyLoss()), torch.randn(5, 4), torch.randint(0, 3, (5,)), BatchGrad())
        model.eval()  # the default predicate: training mode only
        backward(model, extend(nn.CrossEntropyLoss()), torch.randn(5, 4), torch.randint(0, 3, (5,)), BatchGrad())
    finally:
        coupling._COUPLING.pop(Declared)
