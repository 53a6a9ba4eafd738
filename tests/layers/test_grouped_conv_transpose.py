"""Grouped / depthwise transposed convolutions: block-form KFAC against the per-group transposed
convolutions (the groups = 1 adapter, itself checked against BackPACK/curvlinops elsewhere),
exact quantities against dense torch.func."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, BatchGrad, DiagGGN, ExactBlockFisher
from curvlib.solvers import KroneckerInverse
from tests.utils import dense_ggn, per_sample_grads

pytestmark = pytest.mark.usefixtures("float64")
N = 4
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def grouped(d, cin, cout, groups, **kw):
    conv = CONVT[d](cin, cout, 2, groups=groups, **kw)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn((N, cin) + (3,) * d)
    model(x)
    return model, x


class PerGroup(nn.Module):
    """The same function with one transposed convolution per group."""

    def __init__(self, model, d):
        super().__init__()
        conv = model[0]
        B = conv.groups
        cin, cout = conv.in_channels // B, conv.out_channels // B
        self.cin = cin
        self.convs = nn.ModuleList()
        for b in range(B):
            c = CONVT[d](cin, cout, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         output_padding=conv.output_padding, dilation=conv.dilation, bias=conv.bias is not None)
            c.weight.data = conv.weight.data[b * cin:(b + 1) * cin].clone()  # [C_in, C_out/B, *k]
            if conv.bias is not None:
                c.bias.data = conv.bias.data[b * cout:(b + 1) * cout].clone()
            self.convs.append(c)
        self.rest = nn.Sequential(*list(model)[1:])

    def forward(self, x):
        xs = x.split(self.cin, dim=1)
        return self.rest(torch.cat([c(xi) for c, xi in zip(self.convs, xs)], dim=1))


CASES = [(1, 4, 6, 2, {}), (2, 4, 6, 2, {"stride": 2, "padding": 1, "output_padding": 1}),
         (2, 3, 3, 3, {"dilation": 2}),  # depthwise
         (3, 2, 4, 2, {"bias": False})]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("case", CASES)
def test_block_form_equals_per_group_transposed_convolutions(case, fisher_type, approx):
    d, cin, cout, B, kw = case
    model, x = grouped(d, cin, cout, B, **kw)
    y = torch.randint(0, 3, (N,))
    ref = PerGroup(model, d)
    torch.testing.assert_close(ref(x), model(x))
    for m in (model, ref):
        loss_fn = extend(nn.CrossEntropyLoss())
        extend(m)
        with curvature(KFAC(fisher_type=fisher_type, kfac_approx=approx), generator=torch.Generator().manual_seed(0)):
            loss_fn(m(x), y).backward()
    A, G = model[0].weight.kfac  # activation side first (over C_in)
    m = cout // B * model[0].weight[0, 0].numel()
    assert A.shape == (B, cin // B, cin // B) and G.shape == (B, m, m)
    for b, c in enumerate(ref.convs):
        Ab, Gb = c.weight.kfac
        torch.testing.assert_close(A[b], Ab)
        torch.testing.assert_close(G[b], Gb)
    if kw.get("bias", True):
        assert model[0].bias.kfac[0].shape == (cout, cout)
    W = model[0].weight  # the block form through KroneckerInverse
    M = torch.block_diag(*[torch.kron(a, g) for a, g in zip(A, G)]) + 1e-2 * torch.eye(W.numel())
    torch.testing.assert_close(KroneckerInverse(W.kfac, 1e-2)(W.grad.reshape(W.shape[0], -1)).flatten(),
                               torch.linalg.solve(M, W.grad.flatten()))


@pytest.mark.parametrize("case", CASES)
def test_exact_quantities_against_torch_func(case):
    d, cin, cout, B, kw = case
    model, x = grouped(d, cin, cout, B, **kw)
    y = torch.randint(0, 3, (N,))
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(model)
    ggnmp = GGNMP(fisher_type="type-2")
    with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), DiagGGN(fisher_type="type-2"), ggnmp):
        loss_fn(model(x), y).backward()
    ggn = dense_ggn(model, loss_fn, x, y)
    psg = per_sample_grads(model, loss_fn, x, y)
    torch.testing.assert_close(ggnmp.operator().to_dense(), ggn)
    W = model[0].weight
    s = slice(0, W.numel())
    torch.testing.assert_close(W.grad_batch, psg["0.weight"] / N)
    torch.testing.assert_close(W.block_fisher, ggn[s, s])
    torch.testing.assert_close(W.diag_ggn, ggn[s, s].diagonal().reshape(W.shape))
    V = torch.randn(2, *W.shape)
    torch.testing.assert_close(W.ggnmp(V), (V.reshape(2, -1) @ ggn[s, s]).reshape(V.shape))
