"""CrossKFAC: diagonal pairs = KFAC(reduce); all pairs against dense references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlib import extend
from curvlib.extensions.cross_kfac import CrossKFAC
from curvlib.extensions.kfac import KFAC
from curvlib.solvers import kronecker_fisher_mvp
from tests.utils import dense_ef, dense_ggn, param_slices, run
from tests.zoo import NETS, problem

LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


pytestmark = pytest.mark.usefixtures("float64")


def layers_in_forward_order(net, model, x):
    """``(extended layer, input, output)`` in forward order, recorded by plain forward hooks
    on a non-extended copy of ``model`` (so the engine records nothing)."""
    plain = NETS[net][0]()
    plain.load_state_dict(model.state_dict())
    name_of = {id(m): n for n, m in plain.named_modules()}
    extended = dict(model.named_modules())
    seen = []
    for m in plain.modules():
        if isinstance(m, LAYERS):
            m.register_forward_hook(lambda m, i, o: seen.append((extended[name_of[id(m)]], i[0].detach(), o)))
    out = plain(x)
    return seen, out


def abar(module, x):
    """Position-averaged activation vector ``[N, D_a]`` from the layer input (independent of the engine)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.mean(-1)
    return x.flatten(2).mean(-1)  # ConvTranspose: input channels, averaged over input positions


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_diagonal_pairs_equal_kfac_reduce(net, fisher_type):
    model, loss_fn, x, y = problem(net, "ce", "mean")
    ext = CrossKFAC(fisher_type=fisher_type)
    # one context: the mc samples are shared by both extensions
    run(model, loss_fn, x, y, ext, KFAC(fisher_type=fisher_type, kfac_approx="reduce"))
    assert len(ext.params) == len(list(model.parameters()))
    for i, (p, side) in enumerate(zip(ext.params, ext.act_sides)):
        G, A = ext.cross_factors[(i, i)]
        if side is None:  # bias
            torch.testing.assert_close(G, p.kfac[0])
            torch.testing.assert_close(A, torch.ones(1, 1))
        else:
            torch.testing.assert_close([G, A] if side == "right" else [A, G], p.kfac)


@pytest.mark.parametrize("net", list(NETS))
def test_activation_factors_equal_dense_position_means(net):
    model, loss_fn, x, y = problem(net, "mse", "sum")
    ext = CrossKFAC(fisher_type="empirical")
    run(model, loss_fn, x, y, ext)
    seen, _ = layers_in_forward_order(net, model, x)
    assert ext.modules == [m for m, _, _ in seen]
    vecs = []  # per block: [N, D_a] (a constant 1 for a bias)
    for m, inp, _ in seen:
        vecs += [abar(m, inp), torch.ones(x.shape[0], 1)]
    for (i, j), (_, A) in ext.cross_factors.items():
        torch.testing.assert_close(A, vecs[i].T @ vecs[j] / x.shape[0], msg=f"{net}: ({i}, {j})")


@pytest.mark.parametrize("net", ["mlp", "res", "seq", "cnn"])
def test_empirical_cotangent_factors_equal_autograd_output_gradients(net):
    model, loss_fn, x, y = problem(net, "ce", "mean")
    ext = CrossKFAC(fisher_type="empirical")
    run(model, loss_fn, x, y, ext)
    seen, out = layers_in_forward_order(net, model, x)
    outs = [o for _, _, o in seen]
    grads = torch.autograd.grad(loss_fn(out, y), outs)
    N = x.shape[0]
    # sbar = output gradient summed over positions, scaled by sqrt(N) (mean-reduced CE)
    sbar = []
    for (m, _, _), g in zip(seen, grads):
        s = g.flatten(2).sum(-1) if isinstance(m, nn.Conv2d) else g.reshape(N, -1, g.shape[-1]).sum(1)
        sbar += [s * N**0.5] * 2  # weight and bias share the cotangent vectors
    for (i, j), (G, _) in ext.cross_factors.items():
        torch.testing.assert_close(G, sbar[i].T @ sbar[j], msg=f"{net}: ({i}, {j})")


@pytest.mark.parametrize("net", list(NETS))
def test_bias_pairs_are_the_exact_type2_cross_blocks(net):
    """For two biases (activation 1) the Kronecker form is exact: G_ij = GGN[b_i, b_j]."""
    model, loss_fn, x, y = problem(net, "mse", "mean")
    ext = CrossKFAC(fisher_type="type-2")
    run(model, loss_fn, x, y, ext)
    ggn = dense_ggn(model, loss_fn, x, y)
    sl = dict(zip([id(p) for p in model.parameters()], param_slices(model)))
    biases = [i for i, side in enumerate(ext.act_sides) if side is None]
    assert len(biases) >= 2
    for i in biases:
        for j in biases:
            G, A = ext.cross_factors[(i, j)]
            torch.testing.assert_close(G, ggn[sl[id(ext.params[i])], sl[id(ext.params[j])]])
            torch.testing.assert_close(A, torch.ones(1, 1))


def one_position_nets():
    """Nets whose layers all have T = 1 (for the single-sample exactness test)."""
    return {
        "mlp": NETS["mlp"][0],
        "res": NETS["res"][0],
        "convT": lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2), nn.Flatten()),
        "convT_convT": lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, 1), nn.Tanh(), nn.ConvTranspose2d(3, 4, 1), nn.Flatten()
        ),
    }


@pytest.mark.parametrize("net", list(one_position_nets()))
def test_nested_factors_give_the_exact_fisher_for_one_sample(net):
    """With N = 1, K = 1 (empirical) and T = 1 every cross block is exactly a Kronecker
    product, so ``nested()`` through the two-level solver's product must reproduce the EF."""
    model = extend(one_position_nets()[net]())
    x = torch.randn(1, 5) if net in ("mlp", "res") else torch.randn(1, 2, 1, 1)
    out = model(x)
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, out.shape[1], (1,))
    ext = CrossKFAC(fisher_type="empirical")
    run(model, loss_fn, x, y, ext)
    params = list(model.parameters())
    assert [id(p) for p in ext.params] == [id(p) for p in params]
    E = dense_ef(model, loss_fn, x, y)
    mvp = kronecker_fisher_mvp(ext.nested(), [p.shape for p in params])
    V = torch.randn(E.shape[0])
    xs = [V[sl].reshape(p.shape) for sl, p in zip(param_slices(model), params)]
    Fv = torch.cat([t.flatten() for t in mvp(xs)])
    torch.testing.assert_close(Fv, E @ V)


def test_nested_refuses_mixed_orientation_pairs():
    model, loss_fn, x, y = problem("convT", "ce", "mean")
    ext = CrossKFAC(fisher_type="empirical")
    run(model, loss_fn, x, y, ext)
    assert ext.act_sides == ["left", None, "right", None]
    with pytest.raises(NotImplementedError, match="0.weight, 1.weight"):
        ext.nested()
