"""KFAC factors against BackPACK (KFLR/KFAC) and curvlinops (KFACLinearOperator)."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from tests.utils import curvlinops_blocks

LOSSES = {
    "ce": (nn.CrossEntropyLoss, lambda n, c: torch.randint(0, c, (n,))),
    "mse": (nn.MSELoss, lambda n, c: torch.randn(n, c)),
    "bce": (nn.BCEWithLogitsLoss, lambda n, c: torch.rand(n, c).round()),
}


pytestmark = pytest.mark.usefixtures("float64")


def mlp(bias=True):
    return nn.Sequential(
        nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 4, bias=bias), nn.Sigmoid(), nn.Linear(4, 3, bias=bias)
    )


def kfac_of(model, loss_fn, x, y, **kw):
    extend(model)
    extend(loss_fn)
    loss = loss_fn(model(x), y)
    with curvature(KFAC(**kw)):
        loss.backward()
    return [[t.clone() for t in p.kfac] for p in model.parameters()]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_type2_equals_backpack_kflr_factor_by_factor(loss, reduction, bias):
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import KFLR

    make_loss, make_y = LOSSES[loss]
    model = mlp(bias)
    x, y = torch.randn(8, 6), make_y(8, 3)
    ours = kfac_of(model, make_loss(reduction=reduction), x, y, fisher_type="type-2")
    bp_model = bp_extend(mlp(bias))
    bp_model.load_state_dict(model.state_dict())
    loss_val = bp_extend(make_loss(reduction=reduction))(bp_model(x), y)
    with backpack(KFLR()):
        loss_val.backward()
    for factors, p in zip(ours, bp_model.parameters()):
        assert len(factors) == len(p.kflr)
        for a, b in zip(factors, p.kflr):
            torch.testing.assert_close(a, b)


def kron_blocks(factors):
    return [torch.kron(*f) if len(f) == 2 else f[0] for f in factors]


class Residual(nn.Module):
    """Functional residual connections and an in-place ReLU between extended layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        h = h + torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


def conv_nets():
    return {
        "cnn": lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, dilation=2), nn.Flatten(), nn.Linear(2, 4)
        ),
        "residual": Residual,
        "inplace": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 4)),
    }


@pytest.mark.parametrize("net", list(conv_nets()))
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kron_equals_curvlinops_on_conv_nets(net, fisher_type, kfac_approx):
    model = conv_nets()[net]()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    ours = kfac_of(model, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type, kfac_approx=kfac_approx)
    ref = curvlinops_blocks(model, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type, kfac_approx=kfac_approx)
    for b_ours, b_ref in zip(kron_blocks(ours), ref):
        torch.testing.assert_close(b_ours, b_ref)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_kron_equals_curvlinops_with_weight_sharing_linear(loss, reduction, fisher_type):
    """Linear layers on [N, T, D] inputs (extra dims are weight-sharing positions)."""
    make_loss, make_y = LOSSES[loss]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(5, 3, 4)
    y = make_y(5 * 3, 3)
    y = y.reshape(5, 3) if loss == "ce" else y.reshape(5, 3, 3)
    loss_fn = make_loss(reduction=reduction)
    if loss == "ce":  # CrossEntropyLoss wants classes in dim 1
        model.append(Transpose())
    for approx in ["expand", "reduce"]:
        ours = kfac_of(model, loss_fn, x, y, fisher_type=fisher_type, kfac_approx=approx)
        ref = curvlinops_blocks(model, loss_fn, x, y, fisher_type=fisher_type, kfac_approx=approx)
        for b_ours, b_ref in zip(kron_blocks(ours), ref):
            torch.testing.assert_close(b_ours, b_ref)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_conv1d_equals_curvlinops_on_equivalent_conv2d():
    """Conv1d on [N, C, L] is Conv2d with a (1, k) kernel on [N, C, 1, L]."""
    c1 = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2)
    m1 = nn.Sequential(c1, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 4))
    c2 = nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2))
    m2 = nn.Sequential(c2, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 4))
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        c2.bias.copy_(c1.bias)
        m2[3].load_state_dict(m1[3].state_dict())
    x, y = torch.randn(5, 2, 8), torch.randint(0, 4, (5,))
    for ft in ["type-2", "empirical"]:
        ours = kron_blocks(kfac_of(m1, nn.CrossEntropyLoss(), x, y, fisher_type=ft))
        ref = curvlinops_blocks(m2, nn.CrossEntropyLoss(), x.unsqueeze(2), y, fisher_type=ft)
        for b_ours, b_ref in zip(ours, ref):
            torch.testing.assert_close(b_ours, b_ref)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)), (4, 2, 4, 5, 3)),
        (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (4, 2, 5)),
        (lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)), (4, 2, 3, 3)),
        (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (4, 2, 2, 2, 2)),
    ],
)
def test_conv3d_and_transpose_against_torch_func_reference(layer, shape):
    """Independent reference for the per-position factors, built with ``torch.func``.

    Conv: the patch ``a_t`` is the Jacobian of output position ``t`` of a one-channel
    convolution w.r.t. its weight; ``s_t`` is the autograd output gradient.
    ConvTranspose (weight ``[C_in, C_out, *k]``): ``dW = sum_t x_t s_t^T`` over *input*
    positions with ``s_t = d <g, convT(e_t; W)> / dW[c_in]`` for a unit impulse ``e_t``.
    KFAC-expand: first factor ``sum s s^T`` (resp. ``x x^T / (N T)``), second factor
    ``a a^T / (N T)`` (resp. ``sum s s^T``). Empirical Fisher, sum reduction (scale 1).
    """
    lay = layer()
    model = nn.Sequential(lay, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(*shape)
    model(x)
    loss_fn = nn.MSELoss(reduction="sum")
    y = torch.randn(shape[0], 1)
    first, second = kfac_of(model, loss_fn, x, y, fisher_type="empirical")[0]

    out = lay(x)
    out.retain_grad()
    loss_fn(model[1:](out), y).backward()
    g = out.grad.detach()  # [N, C_out, *O]
    gram = lambda v: v.reshape(-1, v.shape[-1]).T @ v.reshape(-1, v.shape[-1])
    if isinstance(lay, nn.modules.conv._ConvTransposeNd):
        xs = x.flatten(2).transpose(1, 2)  # [N, T_in, C_in]
        torch.testing.assert_close(first, gram(xs) / (xs.shape[0] * xs.shape[1]))
        torch.testing.assert_close(second, gram(_convT_cotangent_patches(lay, x, g)))
    else:
        torch.testing.assert_close(first, gram(g.flatten(2).transpose(1, 2)))
        torch.testing.assert_close(second, gram(_conv_patches(lay, x)) / (x.shape[0] * g[0, 0].numel()))


def _conv_patches(lay, x):
    """``[N, T, C_in * prod(k)]`` patches: d y[0, t] / d W[0] of a one-channel convolution."""
    from torch.func import functional_call, jacrev, vmap

    one = type(lay)(lay.in_channels, 1, lay.kernel_size, lay.stride, lay.padding, lay.dilation, bias=False)
    w0 = torch.zeros_like(one.weight)

    def patches(xn):
        return jacrev(lambda w: functional_call(one, {"weight": w}, (xn.unsqueeze(0),)).flatten())(w0)

    return vmap(patches)(x).flatten(2)


def _convT_cotangent_patches(lay, x, g):
    """``[N, T_in, C_out * prod(k)]``: ``d <g_n, convT(e_t; W)> / d W[0]`` per input position."""
    from torch.func import grad, vmap

    S = x.shape[2:]
    T = S.numel()
    impulses = torch.eye(T).reshape(T, 1, 1, *S)  # one channel, unit impulse at t
    conv_t = getattr(torch.nn.functional, f"conv_transpose{len(S)}d")
    w0 = lay.weight.detach()[:1]

    def s_of(gn, imp):
        def f(w):  # w: [1, C_out, *k], the weight row of one input channel
            o = conv_t(imp, w, None, lay.stride, lay.padding, lay.output_padding, 1, lay.dilation)
            return (o[0] * gn).sum()

        return grad(f)(w0).flatten()

    return vmap(lambda gn: vmap(lambda imp: s_of(gn, imp))(impulses))(g)


def test_mc_converges_to_type2():
    model = mlp()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    exact = kfac_of(model, nn.CrossEntropyLoss(), x, y, fisher_type="type-2")
    mc = kfac_of(model, nn.CrossEntropyLoss(), x, y, fisher_type="mc", mc_samples=20000)
    for fe, fm in zip(exact, mc):
        for a, b in zip(fe, fm):
            assert (a - b).norm() / a.norm() < 0.05
    few = kfac_of(model, nn.CrossEntropyLoss(), x, y, fisher_type="mc", mc_samples=1)
    assert (few[-1][0] - exact[-1][0]).norm() / exact[-1][0].norm() > 0.05  # it is random


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_gradient_is_unchanged_and_quantities_are_fresh(fisher_type):
    model = Residual()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 4, (4,))
    loss_fn(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    extend(model)
    extend(loss_fn)
    first = None
    for scale in [1.0, 2.0]:
        model.zero_grad()
        loss = loss_fn(model(scale * x), y)
        with curvature(KFAC(fisher_type=fisher_type)):
            loss.backward()
        if scale == 1.0:
            for p, g in zip(model.parameters(), ref):
                torch.testing.assert_close(p.grad, g)
            first = model.conv1.weight.kfac[1].clone()
    assert not torch.allclose(first, model.conv1.weight.kfac[1])  # A of the new input


def test_cross_entropy_with_positions_matches_curvlinops():
    """CrossEntropyLoss on [N, C, d] logits (per-position predictions)."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 3, 1))
    x, y = torch.randn(5, 2, 6), torch.randint(0, 3, (5, 6))
    for ft in ["type-2", "empirical"]:
        ours = kron_blocks(kfac_of(model, nn.CrossEntropyLoss(), x, y, fisher_type=ft))
        # reference: the same model as Conv2d with height 1 (curvlinops supports Conv2d)
        m2 = nn.Sequential(nn.Conv2d(2, 4, (1, 3), padding=(0, 1)), nn.ReLU(), nn.Conv2d(4, 3, 1))
        with torch.no_grad():
            for c1, c2 in [(model[0], m2[0]), (model[2], m2[2])]:
                c2.weight.copy_(c1.weight.unsqueeze(2))
                c2.bias.copy_(c1.bias)
        ref = curvlinops_blocks(m2, nn.CrossEntropyLoss(), x.unsqueeze(2), y.unsqueeze(1), fisher_type=ft)
        for b_ours, b_ref in zip(ours, ref):
            torch.testing.assert_close(b_ours, b_ref)


def test_cross_layer_option_gives_the_reduce_factors_on_the_diagonal():
    """KFAC(cross_layer=True): diagonal pairs are the reduce factors; off-diagonal pairs
    are E[abar_i abar_j^T] and sum sbar_i sbar_j^T (checked densely for empirical)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    extend(model)
    ext = KFAC(fisher_type="empirical", kfac_approx="reduce", cross_layer=True)
    with curvature(ext):
        loss_fn(model(x), y).backward()
    W0, b0, W1 = model[0].weight, model[0].bias, model[2].weight
    assert ext.cross.params == [W0, b0, W1]
    G00, A00 = ext.cross.cross_factors[(0, 0)]
    torch.testing.assert_close(G00, W0.kfac[0])
    torch.testing.assert_close(A00, W0.kfac[1])
    # off-diagonal: output gradients of both layers from autograd
    h = model[0](x)
    h.retain_grad()
    out = model[2](model[1](h))
    out.retain_grad()
    loss_fn(out, y).backward()
    G02, A02 = ext.cross.cross_factors[(0, 2)]
    torch.testing.assert_close(G02, h.grad.T @ out.grad)
    torch.testing.assert_close(A02, x.T @ torch.tanh(h.detach()) / 6)
