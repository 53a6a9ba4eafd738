"""Grouped / depthwise convolutions: block-form KFAC against the per-group convolutions (and
curvlinops on them), exact quantities against dense torch.func."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, BatchGrad, KFACCorrected, DiagGGN, ExactBlockFisher
from tests.utils import dense_ggn, per_sample_grads

pytestmark = pytest.mark.usefixtures("float64")
N = 4
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def grouped(d, cin, cout, groups, **kw):
    conv = CONV[d](cin, cout, 2, groups=groups, **kw)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn((N, cin) + (4,) * d)
    model(x)
    return model, x


class PerGroup(nn.Module):
    """The same function with one convolution per group."""

    def __init__(self, model, d):
        super().__init__()
        conv = model[0]
        B = conv.groups
        cin, cout = conv.in_channels // B, conv.out_channels // B
        self.cin = cin
        self.convs = nn.ModuleList()
        for b in range(B):
            c = CONV[d](cin, cout, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, bias=conv.bias is not None)
            c.weight.data = conv.weight.data[b * cout:(b + 1) * cout].clone()
            if conv.bias is not None:
                c.bias.data = conv.bias.data[b * cout:(b + 1) * cout].clone()
            self.convs.append(c)
        self.rest = nn.Sequential(*list(model)[1:])

    def forward(self, x):
        xs = x.split(self.cin, dim=1)
        return self.rest(torch.cat([c(xi) for c, xi in zip(self.convs, xs)], dim=1))


CASES = [(1, 4, 6, 2, {}), (2, 4, 6, 2, {"stride": 2, "padding": 1}), (2, 3, 6, 3, {}),  # depthwise x2
         (3, 2, 4, 2, {"bias": False})]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("case", CASES)
def test_block_form_equals_per_group_convolutions(case, fisher_type, approx):
    d, cin, cout, B, kw = case
    model, x = grouped(d, cin, cout, B, **kw)
    y = torch.randint(0, 3, (N,))
    ref = PerGroup(model, d)
    torch.testing.assert_close(ref(x), model(x))
    for m in (model, ref):
        loss_fn = extend(nn.CrossEntropyLoss())
        extend(m)
        with curvature(KFAC(fisher_type=fisher_type, kfac_approx=approx)):
            loss_fn(m(x), y).backward()
    G, A = model[0].weight.kfac
    assert G.shape == (B, cout // B, cout // B) and A.shape[0] == B
    for b, c in enumerate(ref.convs):
        Gb, Ab = c.weight.kfac
        torch.testing.assert_close(G[b], Gb)
        torch.testing.assert_close(A[b], Ab)
    if kw.get("bias", True):
        # the bias block of the grouped layer couples the groups: the dense [C_out, C_out] G
        assert model[0].bias.kfac[0].shape == (cout, cout)
    if d == 2:  # curvlinops supports Conv2d: each group's block
        from curvlinops import KFACLinearOperator

        for b, c in enumerate(ref.convs):
            K = KFACLinearOperator(ref, nn.CrossEntropyLoss(), [c.weight], [(x, y)], fisher_type=fisher_type,
                                   kfac_approx=approx, check_deterministic=False)
            dense = K @ torch.eye(c.weight.numel())
            torch.testing.assert_close(torch.kron(G[b], A[b]), dense)


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


def test_kfac_corrected_refuses_a_grouped_layer_called_twice_clearly():
    """KFACCorrected gives grouped layers the block form (tests/layers/test_grouped_kpsvd.py); a
    grouped layer called twice before one backward is refused with a clear error."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, groups=2)
            self.head = nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            return self.head((self.conv(x) + self.conv(x.flip(-1))).flatten(1))

    model = extend(Twice())
    loss_fn = extend(nn.CrossEntropyLoss())
    x = torch.randn(N, 4, 6, 6)
    with pytest.raises(NotImplementedError, match="grouped .* called 2 times"):
        with curvature(KFACCorrected(fisher_type="type-2")):
            loss_fn(model(x), torch.randint(0, 3, (N,))).backward()


def test_block_form_through_kronecker_inverse():
    from curvlib.solvers import KroneckerInverse

    model, x = grouped(2, 4, 6, 2)
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(model)
    with curvature(KFAC(fisher_type="type-2")):
        loss_fn(model(x), torch.randint(0, 3, (N,))).backward()
    W = model[0].weight
    G, A = W.kfac
    P = KroneckerInverse(W.kfac, 1e-2)
    M = torch.block_diag(*[torch.kron(g, a) for g, a in zip(G, A)]) + 1e-2 * torch.eye(W.numel())
    ref = torch.linalg.solve(M, W.grad.flatten())
    torch.testing.assert_close(P(W.grad.reshape(W.shape[0], -1)).flatten(), ref)
