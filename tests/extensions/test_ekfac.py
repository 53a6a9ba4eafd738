"""EKFAC against curvlinops' EKFACLinearOperator (MLP, CNN) and, for the factor forms curvlinops
does not cover (1-D, block form, transposed convolutions, attention, norm layers, shared layers,
outputs with positions), against the definition ``S = diag(Q^T F Q)`` with ``F`` the exact block
from ``torch.func``."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import EKFAC, KFAC, ExactBlockFisher, kfac_eigenbasis
from curvlib.extensions.ekfac import STRATEGIES, _dense_S
from tests.utils import dense_ggn, dense_kron_terms, exact_blocks, param_slices, per_sample_grads
from tests.zoo import TinyTransformer

pytestmark = pytest.mark.usefixtures("float64")

#: curvlinops' default seed: with it, curvlib's generator draws the same mc targets (with
#: curvlinops' sampler, :func:`curvlinops_draws`)
SEED = 2147483647


@pytest.fixture
def curvlinops_draws(monkeypatch):
    """curvlib's categorical sampler replaced by curvlinops' (``torch.multinomial``, one row per
    prediction): the same generator state draws the same targets in both libraries, so the mc
    factors compare exactly (the sampler itself is tested in ``tests/engine/test_losses.py``)."""
    from curvlib.engine import losses

    monkeypatch.setattr(losses, "sample_categorical",
                        lambda p, m, generator=None: torch.multinomial(p, m, replacement=True, generator=generator))


def dense_ekfac(ekfac):
    """``kron(Q0, Q1) diag(S.flatten()) kron(Q0, Q1)^T`` in any factor form (1-D: identity, block
    form: block diagonal)."""
    Q = dense_kron_terms(ekfac[0])
    return Q @ torch.diag(ekfac[1].flatten()) @ Q.T


def curvlinops_ekfac_blocks(model, loss_fn, data, **kw):
    from curvlinops import EKFACLinearOperator

    params = list(model.parameters())
    E = EKFACLinearOperator(model, loss_fn, params, data, check_deterministic=False, **kw)
    dense = E @ torch.eye(sum(p.numel() for p in params))
    return [dense[s, s] for s in param_slices(model)]


def assert_blocks_close(model, ref):
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(dense_ekfac(p.ekfac), r, rtol=1e-8, atol=1e-8 * float(r.abs().max()))


NETS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)), (8, 6), 3),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, dilation=2), nn.Flatten(), nn.Linear(2, 4)
        ),
        (6, 2, 6, 6),
        4,
    ),
}
LOSSES = {
    "ce": (nn.CrossEntropyLoss, lambda n, c: torch.randint(0, c, (n,))),
    "mse": (nn.MSELoss, lambda n, c: torch.randn(n, c)),
}


def problem(net, loss, reduction, n=None):
    """``(model, loss_fn, x, y)``, ``n`` samples (default: the net's)."""
    make, shape, c = NETS[net]
    shape = (n or shape[0], *shape[1:])
    make_loss, make_y = LOSSES[loss]
    return make(), make_loss(reduction=reduction), torch.randn(*shape), make_y(shape[0], c)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_equals_curvlinops(net, loss, reduction, fisher_type, curvlinops_draws):
    """Every block ``kron(Q0, Q1) diag(S) kron(Q0, Q1)^T`` equals curvlinops' (mc: the same
    targets, drawn with curvlinops' seed and sampler)."""
    model, loss_fn, x, y = problem(net, loss, reduction)
    ref = curvlinops_ekfac_blocks(model, loss_fn, [(x, y)], fisher_type=fisher_type, seed=SEED)
    extend(model), extend(loss_fn)
    with curvature(EKFAC(fisher_type=fisher_type), generator=torch.Generator().manual_seed(SEED)):
        loss_fn(model(x), y).backward()
    assert_blocks_close(model, ref)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_reduce_equals_curvlinops(net, fisher_type):
    """``kfac_approx="reduce"`` changes the eigenbasis only; ``S`` stays the per-sample one. 24
    samples: the reduce factors have full rank (EKFAC's module docstring: in a degenerate
    eigenspace of a factor the basis, hence the block, is not determined)."""
    model, loss_fn, x, y = problem(net, "ce", "mean", n=24)
    ref = curvlinops_ekfac_blocks(model, loss_fn, [(x, y)], fisher_type=fisher_type, kfac_approx="reduce")
    extend(model), extend(loss_fn)
    with curvature(EKFAC(fisher_type=fisher_type, kfac_approx="reduce")):
        loss_fn(model(x), y).backward()
    assert_blocks_close(model, ref)


def test_two_mc_samples_scale_as_the_exact_mc_block():
    """``M`` samples: ``S = diag(Q^T F Q)`` for the mc block ``F`` of the same columns (scaled
    ``1/(N M)``). (curvlinops draws several targets in another order: no direct comparison.)"""
    model, loss_fn, x, y = problem("cnn", "mse", "mean")
    extend(model), extend(loss_fn)
    with curvature(EKFAC(fisher_type="mc", mc_samples=2), ExactBlockFisher(fisher_type="mc", mc_samples=2)):
        loss_fn(model(x), y).backward()
    for p in model.parameters():
        Q = dense_kron_terms(p.ekfac[0])
        F = p.block_fisher
        torch.testing.assert_close(p.ekfac[1].flatten(), torch.diagonal(Q.T @ F @ Q), rtol=1e-8, atol=1e-10 * float(F.abs().max()))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("K, T", [(1, 1), (3, 1), (1, 4), (2, 3)])
def test_contractions_of_a_dense_pair(strategy, K, T):
    """Each contraction of ``_dense_S`` (the cost model picks one per layer) is the definition."""
    s, a = torch.randn(K, 5, T, 3), torch.randn(5, T, 4)
    Qs, Qa = torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(4, 4))[0]
    X = torch.einsum("knts,nta->knsa", s, a)
    ref = (Qs.T @ X @ Qa).square().sum((0, 1))
    torch.testing.assert_close(_dense_S(s, a, Qs, Qa, strategy), ref)


def test_weight_layout_and_basis():
    """``Q0, Q1`` are the eigenvectors of ``p.kfac`` in its order, ``S`` is ``[d0, d1]``."""
    model, loss_fn, x, y = problem("cnn", "ce", "mean")
    extend(model), extend(loss_fn)
    with curvature(KFAC(fisher_type="type-2"), EKFAC(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    W, b = model[0].weight, model[0].bias
    (Q0, Q1), S = W.ekfac
    assert S.shape == (3, 18) and Q0.shape == (3, 3) and Q1.shape == (18, 18)
    for Q, F in zip((Q0, Q1), W.kfac):
        torch.testing.assert_close(Q, torch.linalg.eigh(F).eigenvectors)
    (Qb,), Sb = b.ekfac
    assert Sb.shape == (3,)
    torch.testing.assert_close(Qb, torch.linalg.eigh(b.kfac[0]).eigenvectors)


# ------------------------------------------------------------------ dense references


class Shared(nn.Module):
    """One Linear called twice before the backward (its calls are positions)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def structured(name):
    """``(model, x, y, reduction, loss)``: 3 classes, seeded. Comments: the factor form covered."""
    torch.manual_seed(0)
    N = 7
    ce = nn.CrossEntropyLoss
    y = torch.randint(0, 3, (N,))
    if name in ("embedding", "embedding-padding"):  # 1-D A ([V]), left orientation
        pad = 2 if name == "embedding-padding" else None
        x = torch.randint(0, 7, (N, 4))
        if pad is not None:
            x[:, -1] = pad
        return nn.Sequential(nn.Embedding(7, 3, padding_idx=pad), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), x, y, "mean", ce
    if name == "grouped":  # block form B = 2, grouped activations
        net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
        return net, torch.randn(N, 4, 4, 4), y, "mean", ce
    if name == "grouped-transpose":  # block form, activation side first
        net = nn.Sequential(nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
        return net, torch.randn(N, 4, 2, 2), y, "mean", ce
    if name == "transpose":  # activation side first, dense pair
        net = nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
        return net, torch.randn(N, 2, 2, 2), y, "mean", ce
    if name == "attention":  # in_proj block form B = 3 (weight and bias), LayerNorm scales
        return TinyTransformer(d=4), torch.randn(N, 3, 4), y, "mean", ce
    if name == "shared":  # a layer called twice
        return Shared(), torch.randn(N, 4), y, "mean", ce
    if name == "positions":  # output [N, T, C]: type-2 S from the exact (class, position) columns
        net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        return net, torch.randn(N, 3, 5), torch.randn(N, 3, 3), "sum", nn.MSELoss
    raise KeyError(name)


STRUCTURED = ["embedding", "embedding-padding", "grouped", "grouped-transpose", "transpose", "attention", "shared", "positions"]


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_S_is_the_exact_diagonal_in_the_kfac_eigenbasis(name, fisher_type):
    """``S.flatten() = diag(Q^T F Q)`` with ``Q`` the dense eigenbasis of ``p.ekfac`` (1-D: the
    identity; block form: block diagonal) and ``F`` the exact block of the fisher_type from
    ``torch.func`` (mc: ``ExactBlockFisher`` on the same sampled columns); ``Q``'s factors
    diagonalize ``p.kfac``'s."""
    model, x, y, reduction, make_loss = structured(name)
    loss_fn = make_loss(reduction=reduction)
    if fisher_type != "mc":
        ref = exact_blocks(model, loss_fn, x, y, fisher_type)
    extend(model), extend(loss_fn)
    exts = [KFAC(fisher_type=fisher_type), EKFAC(fisher_type=fisher_type)]
    if fisher_type == "mc":
        exts.append(ExactBlockFisher(fisher_type="mc"))
    with curvature(*exts):
        loss_fn(model(x), y).backward()
    if fisher_type == "mc":
        ref = [p.block_fisher for p in model.parameters()]
    for p, F in zip(model.parameters(), ref):
        Qs, S = p.ekfac
        assert len(Qs) == len(p.kfac)
        Q = dense_kron_terms(Qs)
        scale = float(F.abs().max())
        torch.testing.assert_close(Q.T @ Q, torch.eye(len(Q)))
        torch.testing.assert_close(S.flatten(), torch.diagonal(Q.T @ F @ Q), rtol=1e-8, atol=1e-10 * scale)
        for Qi, Fi in zip(Qs, p.kfac):
            if Fi.dim() == 1:  # diagonal factor: identity basis, 1-D
                assert torch.equal(Qi, torch.ones_like(Fi))
                continue
            D = dense_kron_terms([Qi]).T @ dense_kron_terms([Fi]) @ dense_kron_terms([Qi])
            torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), atol=1e-10 * float(Fi.abs().max()), rtol=0)


def test_shapes_of_the_factor_forms():
    model, x, y, _, _ = structured("attention")
    model_e, xe, ye, _, _ = structured("embedding")
    model_g, xg, yg, _, _ = structured("grouped")
    for m, xi, yi in [(model, x, y), (model_e, xe, ye), (model_g, xg, yg)]:
        loss_fn = extend(nn.CrossEntropyLoss())
        extend(m)
        with curvature(EKFAC(fisher_type="type-2")):
            loss_fn(m(xi), yi).backward()
    att = model.enc.self_attn
    (Q0, Q1), S = att.in_proj_weight.ekfac
    assert Q0.shape == Q1.shape == (3, 4, 4) and S.shape == (3, 4, 4)
    (Qb,), Sb = att.in_proj_bias.ekfac
    assert Qb.shape == (3, 4, 4) and Sb.shape == (3, 4)
    (Qn,), Sn = model.enc.norm1.weight.ekfac
    assert Qn.shape == (4, 4) and Sn.shape == (4,)
    (Qv, Qd), Se = model_e[0].weight.ekfac
    assert Qv.shape == (7,) and Qd.shape == (3, 3) and Se.shape == (7, 3)
    (Qo, Qi), Sg = model_g[0].weight.ekfac
    assert Qo.shape == (2, 3, 3) and Qi.shape == (2, 18, 18) and Sg.shape == (2, 3, 18)


def test_norm_layer_S_is_the_spectrum_of_its_exact_block():
    """A norm layer's ``[G]`` is its exact block: ``S`` are its eigenvalues."""
    model, x, y, _, _ = structured("attention")
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(model)
    with curvature(KFAC(fisher_type="empirical"), EKFAC(fisher_type="empirical")):
        loss_fn(model(x), y).backward()
    for p in (model.enc.norm1.weight, model.enc.norm2.bias, model.head.bias):
        torch.testing.assert_close(p.ekfac[1], torch.linalg.eigvalsh(p.kfac[0]))


def test_type2_with_positions_is_not_the_shared_column_estimate():
    """For an output with positions, ``S`` uses one column per (class, position): the shared
    columns KFAC uses for its factors would add cross-position terms (the test above passes
    because of this choice: check that the two differ here)."""
    model, x, y, reduction, make_loss = structured("positions")
    loss_fn = extend(make_loss(reduction=reduction))
    extend(model)
    with curvature(EKFAC(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    Qs, S = model[0].weight.ekfac
    from curvlib.engine.capture import source_key

    ext = EKFAC(fisher_type="type-2", bases={p: p.ekfac[0] for p in model.parameters()})
    ext.exact_type2 = False  # the shared columns instead
    assert ext.source == source_key("type-2")
    with curvature(ext):
        loss_fn(model(x), y).backward()
    assert not torch.allclose(model[0].weight.ekfac[1], S, rtol=1e-3)


# ------------------------------------------------------------------ several backwards


def test_second_backward_without_bases_raises():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    extend(model), extend(loss_fn)
    with pytest.raises(RuntimeError, match="EKFAC cannot accumulate"):
        with curvature(EKFAC(fisher_type="empirical")):
            loss_fn(model(x[:4]), y[:4]).backward()
            loss_fn(model(x[4:]), y[4:]).backward()


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_two_passes_over_micro_batches_equal_curvlinops_on_the_data_loader(net, fisher_type):
    """KFAC over the micro-batches, then ``EKFAC(bases=...)`` over them again: curvlinops'
    operator on the same two batches."""
    model, loss_fn, x, y = problem(net, "ce", "mean")
    N, h = len(x), len(x) // 3
    batches = [(x[:h], y[:h]), (x[h:], y[h:])]
    ref = curvlinops_ekfac_blocks(model, loss_fn, batches, fisher_type=fisher_type, num_data=N)
    extend(model), extend(loss_fn)

    def passes():
        for xb, yb in batches:
            (loss_fn(model(xb), yb) * len(xb) / N).backward()

    with curvature(KFAC(fisher_type=fisher_type)):
        passes()
    bases = {p: kfac_eigenbasis(p.kfac) for p in model.parameters()}
    with curvature(EKFAC(fisher_type=fisher_type, bases=bases)):
        passes()
    assert_blocks_close(model, ref)
    for p in model.parameters():
        assert all(a is b for a, b in zip(p.ekfac[0], bases[p]))


def test_bases_errors():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    extend(model), extend(loss_fn)
    W = model[4].weight  # the backward reaches the last layer first
    with pytest.raises(KeyError, match="no eigenbasis for the bias"):
        with curvature(EKFAC(fisher_type="empirical", bases={W: [torch.eye(3), torch.eye(4)]})):
            loss_fn(model(x), y).backward()
    bases = {p: [torch.eye(p.shape[0])] for p in model.parameters()}
    with pytest.raises(ValueError, match="1 eigenbases for the weight"):
        with curvature(EKFAC(fisher_type="empirical", bases=bases)):
            loss_fn(model(x), y).backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kfac_approx"):
        EKFAC(kfac_approx="full")
    with pytest.raises(ValueError, match="fisher_type"):
        EKFAC(fisher_type="exact")


def test_kfac_eigenbasis_forms():
    A = torch.randn(5, 5)
    A = A @ A.T
    assert torch.equal(kfac_eigenbasis([torch.rand(4)])[0], torch.ones(4))
    (Q,) = kfac_eigenbasis([A])
    torch.testing.assert_close(Q @ torch.diag(torch.linalg.eigvalsh(A)) @ Q.T, A)
    (Qb,) = kfac_eigenbasis([torch.stack([A, 2 * A])])
    assert Qb.shape == (2, 5, 5)
    with pytest.raises(ValueError, match="NaN"):
        kfac_eigenbasis([torch.full((2, 2), float("nan"))])


def test_fresh_values_and_unchanged_gradient():
    model, loss_fn, x, y = problem("cnn", "ce", "mean")
    loss_fn(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    extend(model), extend(loss_fn)
    with curvature(EKFAC(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g)
    S = model[0].weight.ekfac[1].clone()
    with curvature(EKFAC(fisher_type="type-2")):
        loss_fn(model(2 * x), y).backward()
    assert not torch.allclose(S, model[0].weight.ekfac[1])
