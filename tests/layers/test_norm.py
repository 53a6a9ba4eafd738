"""Norm layers: exact blocks ``[G]`` for weight and bias against dense torch.func."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, KPSVD, BatchGrad, DiagGGN, ExactBlockFisher
from tests.utils import dense_ggn, per_sample_grads

pytestmark = pytest.mark.usefixtures("float64")
N = 5


def perturb(norm):
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return norm


def seq_model(norm):
    return nn.Sequential(nn.Linear(4, 6), perturb(norm), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


def case(kind):
    if kind == "layernorm":
        return seq_model(nn.LayerNorm(6)), torch.randn(N, 4)
    if kind == "layernorm-seq":
        return seq_model(nn.LayerNorm(6)), torch.randn(N, 3, 4)
    if kind == "layernorm-2d":
        return seq_model(nn.LayerNorm([3, 6])), torch.randn(N, 3, 4)
    if kind == "rmsnorm":
        return seq_model(nn.RMSNorm(6)), torch.randn(N, 3, 4)
    if kind == "groupnorm":
        conv = nn.Conv2d(2, 4, 3)
        return nn.Sequential(conv, perturb(nn.GroupNorm(2, 4)), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), torch.randn(N, 2, 5, 5)
    if kind.startswith("batchnorm") and not kind.endswith("flat"):
        d = int(kind[-2])
        bn = [None, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][d](4)
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        bn = perturb(bn).eval()
        conv = [None, nn.Conv1d, nn.Conv2d, nn.Conv3d][d](2, 4, 2)
        shape = (N, 2) + (4,) * d
        return nn.Sequential(conv, bn, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)), torch.randn(shape)
    if kind == "batchnorm1d-flat":
        bn = nn.BatchNorm1d(6)
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        return nn.Sequential(nn.Linear(4, 6), perturb(bn).eval(), nn.Tanh(), nn.Linear(6, 3)), torch.randn(N, 4)
    raise ValueError(kind)


KINDS = ["layernorm", "layernorm-seq", "layernorm-2d", "rmsnorm", "groupnorm", "batchnorm1d",
         "batchnorm2d", "batchnorm3d", "batchnorm1d-flat"]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_blocks_against_torch_func(kind):
    model, x = case(kind)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    extend(model), extend(loss_fn)
    ggnmp = GGNMP(fisher_type="type-2")
    with curvature(KFAC(fisher_type="type-2"), ExactBlockFisher(fisher_type="type-2"),
                   DiagGGN(fisher_type="type-2"), BatchGrad(), ggnmp, KPSVD(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    ggn = dense_ggn(model, loss_fn, x, y)
    torch.testing.assert_close(ggnmp.operator().to_dense(), ggn)  # whole network, cross terms too
    psg = per_sample_grads(model, loss_fn, x, y)
    norm = model[1]
    offsets, i = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = slice(i, i + p.numel())
        i += p.numel()
    names = [n for n, _ in norm.named_parameters()]
    assert names == (["weight"] if kind == "rmsnorm" else ["weight", "bias"])
    for pname in names:
        p = getattr(norm, pname)
        s = offsets[f"1.{pname}"]
        block = ggn[s, s]
        (G,) = p.kfac
        torch.testing.assert_close(G, block)
        torch.testing.assert_close(p.block_fisher, block)
        ((C,),) = p.kpsvd
        torch.testing.assert_close(C, block)
        torch.testing.assert_close(p.diag_ggn, block.diagonal().reshape(p.shape))
        torch.testing.assert_close(p.grad_batch, psg[f"1.{pname}"] / N)
        V = torch.randn(2, *p.shape)
        torch.testing.assert_close(p.ggnmp(V), (V.reshape(2, -1) @ block).reshape(V.shape))


def test_batchnorm_train_mode_keeps_coupling_rule():
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    with pytest.raises(Exception, match="BatchNorm1d"):
        with curvature(ExactBlockFisher(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    model.zero_grad()
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    assert model[1].weight.kfac[0].shape == (6, 6)


def test_no_adapter_warning_left_for_norm_layers():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extend(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GroupNorm(2, 6), nn.RMSNorm(6), nn.BatchNorm1d(6)))
