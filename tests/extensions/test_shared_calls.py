"""A layer called several times before one backward (docs/design.md §2): shared weights, an
unrolled recurrence, a GAN's discriminator on real and fake data with two extended losses.

Exact quantities against dense ``torch.func`` (float64): per-sample gradients, GGN blocks,
the whole-network GGN, its diagonal, the empirical Fisher, KPSVD / KFACCorrected against the
SVD of the rearranged dense block, and the Hessian.
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlib import curvature, extend
from curvlib.extensions import (
    DiagGGN,
    ExactBlockFisher,
    GGNMP,
    HMP,
    KFAC,
    KFACCorrected,
    KPSVD,
    BatchGrad,
)

pytestmark = pytest.mark.usefixtures("float64")

N = 6


# ------------------------------------------------------------------ the three models
class SharedMLP(nn.Module):
    """``mid`` applied twice in sequence."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


class UnrolledRNN(nn.Module):
    """``h_t = tanh(inp(x_t) + cell(h_{t-1}))``: ``inp`` and ``cell`` called ``T`` times."""

    def __init__(self, D=3, H=4, C=3):
        super().__init__()
        self.H = H
        self.inp, self.cell, self.head = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):  # [N, T, D]
        h = torch.zeros(x.shape[0], self.H, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.cell(h))
        return self.head(h)


class Case:
    """A model, its objective (forwards + extended losses, one backward) and dense references.

    ``outputs(params)``: every model output fed to a loss, concatenated ``[M]``;
    ``loss_of(out)``: the objective as a function of those outputs;
    ``sample_terms(params)``: ``[N]`` per-sample contributions that sum to the objective.
    """

    def objective(self):
        raise NotImplementedError

    def params(self):
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def dense_ggn(self):
        p = self.params()
        out = self.outputs(p)
        J = jacrev(self.outputs)(p)
        J = torch.cat([J[k].reshape(out.numel(), -1) for k in p], dim=1)
        H = hessian(self.loss_of)(out.detach())
        return J.T @ H @ J

    def dense_hessian(self):
        p = self.params()
        flat = torch.cat([v.flatten() for v in p.values()])
        sizes = [v.numel() for v in p.values()]

        def f(z):
            parts = dict(zip(p, [t.reshape(v.shape) for t, v in zip(z.split(sizes), p.values())]))
            return self.loss_of(self.outputs(parts))

        return hessian(f)(flat)

    def per_sample(self):
        g = jacrev(self.sample_terms)(self.params())
        return {k: v for k, v in g.items()}

    def dense_ef(self):
        """The engine's empirical Fisher: ``kappa sum_n grad l_n grad l_n^T`` with
        ``kappa = 1/N`` (mean reductions), i.e. ``N sum_n c_n c_n^T`` for the contributions
        ``c_n = grad l_n / N``."""
        g = self.per_sample()
        U = torch.cat([v.reshape(N, -1) for v in g.values()], dim=1)
        return N * U.T @ U


class MLPCase(Case):
    def __init__(self):
        self.model = extend(SharedMLP())
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.x, self.y = torch.randn(N, 4), torch.randint(0, 3, (N,))

    def objective(self):
        return self.loss_fn(self.model(self.x), self.y)

    def outputs(self, p):
        return functional_call(self.model, p, (self.x,)).flatten()

    def loss_of(self, out):
        return nn.functional.cross_entropy(out.reshape(N, -1), self.y)

    def sample_terms(self, p):
        out = functional_call(self.model, p, (self.x,))
        return nn.functional.cross_entropy(out, self.y, reduction="none") / N


class RNNCase(MLPCase):
    def __init__(self, T=3):
        self.model = extend(UnrolledRNN())
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.x, self.y = torch.randn(N, T, 3), torch.randint(0, 3, (N,))


class GANCase(Case):
    """``bce(D(real), 1) + bce(D(fake), 0)``: two forwards of ``D``, two extended losses."""

    def __init__(self):
        self.model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)))
        gen = nn.Linear(2, 4)
        self.real = torch.randn(N, 4)
        self.fake = gen(torch.randn(N, 2)).detach()
        self.loss_real, self.loss_fake = extend(nn.BCEWithLogitsLoss()), extend(nn.BCEWithLogitsLoss())
        self.ones, self.zeros = torch.ones(N, 1), torch.zeros(N, 1)

    def objective(self):
        return self.loss_real(self.model(self.real), self.ones) + self.loss_fake(self.model(self.fake), self.zeros)

    def outputs(self, p):
        return torch.cat([functional_call(self.model, p, (x,)) for x in (self.real, self.fake)]).flatten()

    def loss_of(self, out):
        f = nn.functional.binary_cross_entropy_with_logits
        return f(out[:N, None], self.ones) + f(out[N:, None], self.zeros)

    def sample_terms(self, p):
        f = nn.functional.binary_cross_entropy_with_logits
        r = f(functional_call(self.model, p, (self.real,)), self.ones, reduction="none")
        k = f(functional_call(self.model, p, (self.fake,)), self.zeros, reduction="none")
        return (r + k).reshape(N) / N


class ConvGANCase(GANCase):
    """A convolutional discriminator on real and fake images."""

    def __init__(self):
        super().__init__()
        self.model = extend(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 1)))
        self.real, self.fake = torch.randn(N, 1, 4, 4), torch.randn(N, 1, 4, 4) + 0.5


class SharedEmbedding(nn.Module):
    """One embedding on two token sequences (a structured per-sample rule per call)."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 3), nn.Linear(3, 3)

    def forward(self, x):  # [N, 2, T] tokens
        return self.out(torch.tanh(self.emb(x[:, 0]).mean(1) + self.emb(x[:, 1]).mean(1)))


class EmbeddingCase(MLPCase):
    def __init__(self):
        self.model = extend(SharedEmbedding())
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.x, self.y = torch.randint(0, 7, (N, 2, 3)), torch.randint(0, 3, (N,))


CASES = {
    "shared_mlp": MLPCase, "unrolled_rnn": RNNCase, "gan": GANCase, "conv_gan": ConvGANCase,
    "embedding": EmbeddingCase,
}


def slices(model):
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(i, i + p.numel())
        i += p.numel()
    return out


def run(case, *exts):
    case.model.zero_grad()
    loss = case.objective()
    with curvature(*exts):
        loss.backward()
    return loss


def rearranged(F, d0, d1):
    """Van Loan rearrangement ``[d0^2, d1^2]`` of a ``[d0 d1, d0 d1]`` block."""
    return F.reshape(d0, d1, d0, d1).permute(0, 2, 1, 3).reshape(d0 * d0, d1 * d1)


# ------------------------------------------------------------------ exact quantities
@pytest.mark.parametrize("case", CASES)
def test_batch_grad_and_gradient(case):
    c = CASES[case]()
    run(c, BatchGrad())
    ref = c.per_sample()
    for name, p in c.model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)


@pytest.mark.parametrize("case", CASES)
def test_diag_block_and_whole_network_ggn(case):
    c = CASES[case]()
    ggnmp = GGNMP(fisher_type="type-2")
    run(c, DiagGGN(fisher_type="type-2"), ExactBlockFisher(fisher_type="type-2"), ggnmp)
    F = c.dense_ggn()
    sl = slices(c.model)
    for name, p in c.model.named_parameters():
        blk = F[sl[name], sl[name]]
        torch.testing.assert_close(p.block_fisher, blk)
        torch.testing.assert_close(p.diag_ggn.flatten(), blk.diagonal())
        V = torch.randn(3, *p.shape)
        torch.testing.assert_close(p.ggnmp(V).reshape(3, -1), V.reshape(3, -1) @ blk)
    op = ggnmp.operator()
    order = torch.cat([torch.arange(F.shape[0])[sl[n]] for p in op.params for n, q in c.model.named_parameters() if q is p])
    torch.testing.assert_close(op.to_dense(), F[order][:, order])


@pytest.mark.parametrize("case", CASES)
def test_empirical_fisher_blocks(case):
    c = CASES[case]()
    run(c, ExactBlockFisher(fisher_type="empirical"))
    F = c.dense_ef()
    sl = slices(c.model)
    for name, p in c.model.named_parameters():
        torch.testing.assert_close(p.block_fisher, F[sl[name], sl[name]])


@pytest.mark.parametrize("case", CASES)
def test_kpsvd_and_kfac_corrected_against_the_rearranged_dense_block(case):
    c = CASES[case]()
    run(c, KPSVD(fisher_type="type-2", rank=1, method="lanczos"), KFAC(fisher_type="type-2"))
    # (a 1-D factor, Embedding's token frequencies, is a diagonal matrix)
    kfac = {n: [t.diag() if t.ndim == 1 else t.clone() for t in p.kfac] for n, p in c.model.named_parameters()}
    run(c, KFACCorrected(fisher_type="type-2"))
    F = c.dense_ggn()
    sl = slices(c.model)
    for name, p in c.model.named_parameters():
        blk = F[sl[name], sl[name]]
        if p.ndim == 1:
            torch.testing.assert_close(p.kpsvd[0][0], blk)
            continue
        d0, d1 = p.shape[0], p[0].numel()
        U, S, Vh = torch.linalg.svd(rearranged(blk, d0, d1))
        best = torch.kron(S[0] * U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1))
        (G, A), = p.kpsvd
        torch.testing.assert_close(torch.kron(G, A), best)
        # KFACCorrected: the KFAC term, plus the best Kronecker term of the residual
        (G0, A0), (S1, R1) = p.kfac_corrected
        torch.testing.assert_close(torch.kron(G0, A0), torch.kron(*kfac[name]))
        res = rearranged(blk, d0, d1) - kfac[name][0].reshape(-1, 1) * kfac[name][1].reshape(1, -1)
        U, S, Vh = torch.linalg.svd(res)
        torch.testing.assert_close(torch.kron(S1, R1), torch.kron(S[0] * U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1)))


@pytest.mark.parametrize("case", CASES)
def test_hessian_products_block_and_whole_network(case):
    c = CASES[case]()
    hmp = HMP()
    run(c, hmp)
    H = c.dense_hessian()
    sl = slices(c.model)
    for name, p in c.model.named_parameters():
        V = torch.randn(2, *p.shape)
        torch.testing.assert_close(p.hmp(V).reshape(2, -1), V.reshape(2, -1) @ H[sl[name], sl[name]])
    op = hmp.operator()
    order = torch.cat([torch.arange(H.shape[0])[sl[n]] for p in op.params for n, q in c.model.named_parameters() if q is p])
    torch.testing.assert_close(op.to_dense(), H[order][:, order])


def test_a_call_of_another_forward_not_reached_is_left_for_its_own_backward():
    """Two forwards, two backwards: each backward gets its own calls only."""
    c = MLPCase()
    c.model.zero_grad()
    first = c.objective()
    x2 = torch.randn(N, 4)
    second = c.loss_fn(c.model(x2), c.y)
    with curvature(BatchGrad()):
        first.backward()
    gb1 = {n: p.grad_batch.clone() for n, p in c.model.named_parameters()}
    with curvature(BatchGrad()):
        second.backward()
    ref1 = c.per_sample()
    c.x = x2
    ref2 = c.per_sample()
    for name, p in c.model.named_parameters():
        torch.testing.assert_close(gb1[name], ref1[name])
        torch.testing.assert_close(p.grad_batch, ref2[name])


def test_gradient_accumulation_over_shared_calls():
    """Two micro-batches through the shared model = one backward on both."""
    c = MLPCase()
    full = KFAC(fisher_type="type-2")
    run(c, BatchGrad(), full, GGNMP(fisher_type="type-2"))
    ref = {n: (p.grad_batch.clone(), [t.clone() for t in p.kfac]) for n, p in c.model.named_parameters()}
    ggn = c.dense_ggn()
    c.model.zero_grad()
    op_ext = GGNMP(fisher_type="type-2")
    x, y = c.x, c.y
    with curvature(BatchGrad(), KFAC(fisher_type="type-2"), op_ext):
        for xb, yb in zip(x.split(3), y.split(3)):
            (c.loss_fn(c.model(xb), yb) * len(xb) / len(x)).backward()
    for name, p in c.model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name][0])
        for a, b in zip(p.kfac, ref[name][1]):
            torch.testing.assert_close(a, b)
    assert torch.allclose(op_ext.operator().to_dense(), ggn)  # parameters in model order here


def test_coupling_between_calls_is_detected():
    """A batch-coupling operation between the two calls of a shared layer: the probe finds it."""

    class Coupled(SharedMLP):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.mid(h))
            h = h - h.mean(0, keepdim=True)  # couples the samples
            return self.out(torch.tanh(self.mid(h)))

    model = extend(Coupled())
    loss = extend(nn.CrossEntropyLoss())(model(torch.randn(N, 4)), torch.randint(0, 3, (N,)))
    with pytest.raises(RuntimeError, match="couples"):
        with curvature(BatchGrad()):
            loss.backward()


def test_calls_with_different_batch_sizes():
    """KFAC takes the rows of all calls; exact quantities refuse, naming the layer."""
    D = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)))
    bce = extend(nn.BCEWithLogitsLoss())
    a, b = torch.randn(4, 4), torch.randn(6, 4)

    def objective():
        D.zero_grad()
        return bce(D(a), torch.ones(4, 1)) + bce(D(b), torch.zeros(6, 1))

    loss = objective()
    with curvature(KFAC(fisher_type="type-2")):
        loss.backward()
    G, A = D[0].weight.kfac
    torch.testing.assert_close(A, torch.cat([a, b]).T @ torch.cat([a, b]) / 10)
    loss = objective()
    with pytest.raises(ValueError, match=r"batches of sizes \[4, 6\]"):
        with curvature(BatchGrad()):
            loss.backward()


def test_a_discarded_forward_is_freed_with_its_graph():
    """Repeated forwards without a backward keep no memory: an earlier call lives exactly as
    long as its graph."""
    import gc
    import weakref

    from curvlib.engine.state import ENGINE

    model = extend(nn.Sequential(nn.Linear(4, 3)))
    out = model(torch.randn(5, 4))
    (call,) = list(ENGINE.calls_of[model[0]])
    ref = weakref.ref(call)
    del call
    model(torch.randn(5, 4))  # the first call is handed to its graph, which `out` keeps
    gc.collect()
    assert ref() is not None and ref().demoted
    del out
    gc.collect()
    assert ref() is None


def test_refusals_name_the_layer():
    """Cross-layer KFAC and KFACCorrected(reduce) refuse a shared layer with a clear error."""
    c = MLPCase()
    with pytest.raises(NotImplementedError, match=r"Linear\(in_features=5, out_features=5.*called 2 times"):
        run(c, KFAC(fisher_type="type-2", cross_layer=True))
    with pytest.raises(NotImplementedError, match="kfac_approx='expand'"):
        run(c, KFACCorrected(fisher_type="type-2", kfac_approx="reduce"))
