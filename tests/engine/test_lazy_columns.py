"""Matrix-free columns (``curvlib.engine.lazy_columns``): GGN products of layers whose columns
the engine leaves unstored equal the dense ``torch.func`` GGN (blocks and whole network), before
and after the ski-rental switch to stored columns, for every architecture element the JVP/VJP
passes (pooling, residual adds, GELU, sequences), MC sampling, gradient accumulation and two
losses; unsupported operations keep stored columns; the cost model's choices."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine import lazy_columns
from curvlib.extensions import GGNMP
from curvlib.optim import CGNewton
from tests.optim.common import blocks, train_step
from tests.utils import dense_ggn, param_slices

pytestmark = pytest.mark.usefixtures("float64")

C = 8  # classes: K = 8 columns, so a matrix-free layer takes up to 4 directions


class Square(torch.autograd.Function):
    """``x^2`` with a backward that cannot be differentiated again."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, C)

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        h = h + torch.tanh(self.conv1(h))  # residual add
        return self.head(nn.functional.avg_pool2d(h, 2).flatten(1))


class SeqNet(nn.Module):
    """Linear layers over positions (``[N, T, D]``), GELU, mean over positions."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x))).mean(1)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)

    def forward(self, x):
        return self.b(Square.apply(self.a(x)))


NETS = {
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C)), (6, 2, 6, 6)),
    "res": (ResBlock, (5, 2, 8, 8)),
    "seq": (SeqNet, (6, 3, 4)),
    "unsupported": (Unsupported, (6, 4)),
    # norm layers between (BatchNorm in eval mode: independent samples); their own scale and
    # shift are stored (summed parameters), which stops the matrix-free cut at them
    "norms": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 3, 2), nn.BatchNorm2d(3),
                                    nn.ReLU(), nn.Flatten(), nn.Linear(27, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, C)),
              (6, 2, 6, 6)),
}


@pytest.fixture
def all_matrix_free(monkeypatch):
    """The cost model replaced by 'every eligible call matrix-free'."""

    def plan(costs, K, batched=False):
        n = 0
        while n < len(costs) and costs[n][0]:
            n += 1
        return n

    monkeypatch.setattr(lazy_columns, "plan", plan)


def setup(name, loss="ce", n=None):
    torch.manual_seed(0)
    make, shape = NETS[name]
    model = extend(make())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(*shape)
    if loss == "ce":
        loss_fn, y = extend(nn.CrossEntropyLoss()), torch.randint(0, C, (shape[0],))
    else:
        loss_fn, y = extend(nn.MSELoss()), torch.randn(shape[0], C)
    run(model, loss_fn, x, y, GGNMP())  # the first capture of a model probes for coupling (stored)
    return model, loss_fn, x, y


def run(model, loss_fn, x, y, ext):
    with curvature(ext):
        loss_fn(model(x), y).backward()
    model.zero_grad()
    return ext


def lazy_layers(ext):
    return [m for m, b in ext._blocks.items() if b.lazy is not None]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", ["cnn", "res", "seq", "norms"])
def test_block_products_equal_dense_ggn(all_matrix_free, name, loss):
    model, loss_fn, x, y = setup(name, loss)
    ext = run(model, loss_fn, x, y, GGNMP())
    assert lazy_layers(ext), "no layer was left matrix-free"
    G = dense_ggn(model, loss_fn, x, y)
    for B in (1, 1, 3):  # one direction at a time, then past the switch to stored columns
        for sl, p in zip(param_slices(model), model.parameters()):
            V = torch.randn(B, *p.shape)
            ref = (V.reshape(B, -1) @ G[sl, sl]).reshape(V.shape)
            torch.testing.assert_close(p.ggnmp(V), ref)
    assert not lazy_layers(ext)  # ski-rental: the columns are stored after K / 2 directions


def test_matrix_free_survives_the_freed_graph(all_matrix_free):
    """The products run after ``backward()`` freed the forward graph (no retain_graph)."""
    model, loss_fn, x, y = setup("cnn")
    ext = run(model, loss_fn, x, y, GGNMP())
    first = model[0]
    assert first in lazy_layers(ext)
    G = dense_ggn(model, loss_fn, x, y)
    sl = param_slices(model)[0]
    v = torch.randn(1, *first.weight.shape)
    torch.testing.assert_close(first.weight.ggnmp(v), (v.reshape(1, -1) @ G[sl, sl]).reshape(v.shape))
    assert first in lazy_layers(ext)  # one direction: still matrix-free


@pytest.mark.parametrize("name", ["cnn", "res"])
def test_operator_equals_dense_ggn(all_matrix_free, name):
    model, loss_fn, x, y = setup(name)
    ext = run(model, loss_fn, x, y, GGNMP())
    assert lazy_layers(ext)
    F = ext.operator()
    G = dense_ggn(model, loss_fn, x, y)
    for i in range(5):  # a layer's parameters share one direction: K / 2 = 3.5 products matrix-free
        assert bool(lazy_layers(ext)) == (i < 4)
        v = torch.randn(G.shape[0])
        vs = [v[sl].reshape(p.shape) for sl, p in zip(param_slices(model), model.parameters())]
        out = torch.cat([o.flatten() for o in F(vs)])
        torch.testing.assert_close(out, G @ v)


def same_as_stored(model, backward, **kw):
    """Run ``backward()`` in a context with ``GGNMP(**kw)`` matrix-free and again storing all
    columns (same random state: same MC targets); assert equal block products. Returns the
    matrix-free extension."""
    outs, exts = [], []
    for lazy in (True, False):
        ext = GGNMP(lazy_columns=lazy, **kw)
        torch.manual_seed(1)
        with curvature(ext):
            backward()
        model.zero_grad()
        torch.manual_seed(2)
        outs.append([p.ggnmp(torch.randn(1, *p.shape)) for p in model.parameters()])
        exts.append(ext)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    return exts[0]


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_mc_and_empirical_equal_stored_columns(all_matrix_free, fisher_type):
    model, loss_fn, x, y = setup("cnn")
    ext = same_as_stored(model, lambda: loss_fn(model(x), y).backward(), fisher_type=fisher_type,
                         mc_samples=4 if fisher_type == "mc" else 1)
    assert bool(lazy_layers(ext)) == (fisher_type == "mc")  # one empirical column: always stored


def test_gradient_accumulation_equals_stored_columns(all_matrix_free):
    model, loss_fn, x, y = setup("cnn")

    def backward():
        for i in (slice(0, 3), slice(3, 6)):
            loss_fn(model(x[i]), y[i]).backward()

    ext = same_as_stored(model, backward)
    assert all(any(b.lazy is not None for b in blocks.values()) for blocks in ext._backwards)  # both


def test_two_losses_in_one_backward(all_matrix_free):
    """The second loss reaches a layer the first left matrix-free: its columns are stored then."""
    model, loss_fn, x, y = setup("cnn")
    mse, t = extend(nn.MSELoss()), torch.randn(x.shape[0], C)

    def backward():
        out = model(x)
        (loss_fn(out, y) + mse(out, t)).backward()

    same_as_stored(model, backward)


def test_unsupported_operation_keeps_stored_columns(all_matrix_free):
    model, loss_fn, x, y = setup("unsupported")
    ext = run(model, loss_fn, x, y, GGNMP())
    assert not lazy_layers(ext)  # Square's backward is once_differentiable
    G = dense_ggn(model, loss_fn, x, y)
    for sl, p in zip(param_slices(model), model.parameters()):
        V = torch.randn(1, *p.shape)
        torch.testing.assert_close(p.ggnmp(V), (V.reshape(1, -1) @ G[sl, sl]).reshape(V.shape))


def test_other_extensions_keep_stored_columns(all_matrix_free):
    from curvlib.extensions import KFAC

    model, loss_fn, x, y = setup("cnn")
    ext = GGNMP()
    with curvature(ext, KFAC()):
        loss_fn(model(x), y).backward()
    assert not lazy_layers(ext)


def test_cg_newton_block_step_equals_dense(all_matrix_free):
    model, loss_fn, x, y = setup("cnn")
    before = [p.detach().clone() for p in model.parameters()]
    lam, lr = 0.1, 0.5
    opt = CGNewton(model.parameters(), lr=lr, damping=lam, tol=1e-13, atol=0.0, maxiter=500)
    train_step(model, loss_fn, opt, x, y)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    after = [p.detach().clone() for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)
    for Cb, g, a, b in zip(blocks(dense_ggn(model, loss_fn, x, y), model), grads, after, before):
        ref = -lr * torch.linalg.solve(Cb + lam * torch.eye(len(Cb)), g.flatten())
        torch.testing.assert_close((a - b).flatten(), ref, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the cost model


def cg_newton_cnn_costs(N=64):
    """(eligible, multiply-adds, output entries, parameters) of the CG-Newton example's CNN."""
    shapes = [(N, 10, 24, 24, 25), (N, 20, 8, 8, 250), (N, 50, 1, 1, 320), (N, 10, 1, 1, 50)]
    return [(True, n * c * h * w * k, n * c * h * w, 2) for n, c, h, w, k in shapes]


def test_plan_leaves_the_expensive_early_columns_matrix_free():
    costs = cg_newton_cnn_costs()
    assert lazy_columns.plan(costs, K=9) == 2  # both convolutions (measured best: README)
    assert lazy_columns.plan(costs, K=1) == 0  # one column (empirical Fisher): always stored
    costs[0] = (False,) + costs[0][1:]
    assert lazy_columns.plan(costs, K=9) == 0  # the cut cannot pass an ineligible call


def test_batched_columns_stay_stored():
    """Small columns go through the backward several at a time: always stored (even where the
    multiply-add estimate alone prefers products, as for the bench_ggnmp MLP)."""
    N = 128
    costs = [(True, N * 256 * 784, N * 256, 2), (True, N * 128 * 256, N * 128, 2), (True, N * 10 * 128, N * 10, 2)]
    assert lazy_columns.plan(costs, K=9, batched=True) == 0
    model = extend(nn.Sequential(nn.Linear(20, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.Sigmoid(), nn.Linear(12, C)))
    loss_fn, x, y = extend(nn.CrossEntropyLoss()), torch.randn(32, 20), torch.randint(0, C, (32,))
    run(model, loss_fn, x, y, GGNMP())
    assert not lazy_layers(run(model, loss_fn, x, y, GGNMP()))


def test_large_columns_of_an_early_convolution_are_matrix_free():
    """The cost model itself (no fixture) on a CNN shaped like the CG-Newton example's."""
    model = extend(nn.Sequential(nn.Conv2d(1, 6, 5), nn.Sigmoid(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.Sigmoid(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12 * 16, C)))
    loss_fn, x, y = extend(nn.CrossEntropyLoss()), torch.randn(64, 1, 28, 28), torch.randint(0, C, (64,))
    run(model, loss_fn, x, y, GGNMP())
    ext = run(model, loss_fn, x, y, GGNMP())
    assert model[0] in lazy_layers(ext) and model[-1] not in lazy_layers(ext)
    assert not lazy_layers(run(model, loss_fn, x, y, GGNMP(lazy_columns=False)))


def test_forward_macs():
    assert lazy_columns.forward_macs(nn.Conv2d(3, 4, 5), 4 * 10) == 4 * 10 * 75
    assert lazy_columns.forward_macs(nn.Linear(7, 2), 2 * 3) == 2 * 3 * 7
    assert lazy_columns.forward_macs(nn.LayerNorm(4), 8) == 0


def test_support_walk_is_not_recursive():
    """A graph far deeper than Python's recursion limit (a long unrolled chain)."""
    x = torch.randn(3, 4, requires_grad=True)
    h = x * 2
    edge = torch.autograd.graph.get_gradient_edge(h)
    for _ in range(5000):
        h = torch.tanh(h)
    assert lazy_columns.supported_between(h.sum(1), [edge]) == [True]
    assert lazy_columns.supported_between(torch.cumsum(h, 1), [edge]) == [False]  # CumsumBackward
