"""nn.Embedding: KFAC against curvlinops on the one-hot Linear equivalent; exact quantities
against dense torch.func; a 50,000-token vocabulary without dense V x V or one-hot tensors."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from curvlib import curvature, extend
from curvlib.engine.layers.embedding import EmbeddingAdapter
from curvlib.extensions import KFAC, BatchGrad, DiagGGN, ExactBlockFisher
from tests.utils import dense_ggn, param_slices, per_sample_grads

pytestmark = pytest.mark.usefixtures("float64")

V, D, T, C, N = 7, 3, 4, 3, 6


def make(padding_idx=None, T=T):
    emb = nn.Embedding(V, D, padding_idx=padding_idx)
    model = nn.Sequential(emb, nn.Tanh(), nn.Flatten(), nn.Linear(T * D, C))
    x = torch.randint(0, V, (N, T))
    if padding_idx is not None:
        x[:, -1] = padding_idx
    return model, x, torch.randint(0, C, (N,))


class OneHotLinear(nn.Module):
    """The one-hot Linear equivalent of the embedding (weight = E.weight.T)."""

    def __init__(self, model):
        super().__init__()
        self.lin = nn.Linear(V, D, bias=False)
        self.lin.weight.data = model[0].weight.data.T.clone()
        self.rest = nn.Sequential(*list(model)[1:])

    def forward(self, a):
        return self.rest(self.lin(a))


def one_hot(x, padding_idx):
    a = F.one_hot(x, V).double()
    if padding_idx is not None:
        a[x == padding_idx] = 0
    return a


def emb_order(block):
    """The Linear(V, D) weight block (order (d, v)) in Embedding order (v, d)."""
    B = rearrange(block, "(d v) (e w) -> v d w e", d=D, v=V, e=D, w=V)
    return B.reshape(V * D, V * D)


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_kfac_equals_curvlinops_one_hot_linear(padding_idx, fisher_type):
    from curvlinops import KFACLinearOperator

    model, x, y = make(padding_idx)
    loss_fn = nn.CrossEntropyLoss()
    extend(model), extend(loss_fn)
    gen = torch.Generator().manual_seed(3)
    with curvature(KFAC(fisher_type=fisher_type, mc_samples=200 if fisher_type == "mc" else 1)):
        loss_fn(model(x), y).backward()
    A, G = model[0].weight.kfac
    assert A.shape == (V,) and G.shape == (D, D)
    if padding_idx is not None:
        assert A[padding_idx] == 0
    counts = torch.bincount(x.flatten(), minlength=V).double()
    if padding_idx is not None:
        counts[padding_idx] = 0
    torch.testing.assert_close(A, counts / x.numel())
    if fisher_type == "mc":
        return  # sampling differs from curvlinops'; A is checked, G as type-2 is below
    ref = OneHotLinear(model)
    a = one_hot(x, padding_idx)
    K = KFACLinearOperator(ref, loss_fn, [ref.lin.weight], [(a, y)], fisher_type=fisher_type,
                           check_deterministic=False)
    dense = K @ torch.eye(V * D)
    torch.testing.assert_close(torch.kron(torch.diag(A), G), emb_order(dense))


def test_kfac_reduce_one_token_equals_expand_and_refused_for_many():
    model, x, y = make(T=1)
    extend(model)
    for approx in ("expand", "reduce"):
        with curvature(KFAC(fisher_type="empirical", kfac_approx=approx)):
            nn.CrossEntropyLoss()(model(x), y).backward()
        A, G = model[0].weight.kfac
        model.zero_grad()
        if approx == "expand":
            A0, G0 = A, G
    torch.testing.assert_close(A, A0), torch.testing.assert_close(G, G0)
    model, x, y = make()
    extend(model)
    with pytest.raises(NotImplementedError, match="reduce.*Embedding|Embedding.*reduce"):
        with curvature(KFAC(fisher_type="empirical", kfac_approx="reduce")):
            nn.CrossEntropyLoss()(model(x), y).backward()


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_exact_quantities_against_torch_func(padding_idx):
    model, x, y = make(padding_idx)
    loss_fn = nn.CrossEntropyLoss()
    extend(model), extend(loss_fn)
    with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), DiagGGN(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    E = model[0].weight
    ref = per_sample_grads(model, loss_fn, x, y)["0.weight"] / N
    torch.testing.assert_close(E.grad_batch, ref)
    if padding_idx is not None:
        assert (E.grad_batch[:, padding_idx] == 0).all()
    ggn = dense_ggn(model, loss_fn, x, y)[param_slices(model)[0], param_slices(model)[0]]
    torch.testing.assert_close(E.block_fisher, ggn)
    torch.testing.assert_close(E.diag_ggn, ggn.diagonal().reshape(V, D))


def test_one_token_per_sample_input():
    """A 1-D index input ``[N]`` (one token per sample)."""
    emb = nn.Embedding(V, D)
    model = extend(nn.Sequential(emb, nn.Tanh(), nn.Linear(D, C)))
    x, y = torch.randint(0, V, (N,)), torch.randint(0, C, (N,))
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    torch.testing.assert_close(emb.weight.grad_batch, per_sample_grads(model, loss_fn, x, y)["0.weight"] / N)
    s = param_slices(model)[0]
    torch.testing.assert_close(emb.weight.block_fisher, dense_ggn(model, loss_fn, x, y)[s, s])


def test_scale_grad_by_freq_refused():
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        extend(nn.Sequential(nn.Embedding(V, D, scale_grad_by_freq=True)))


def test_large_vocabulary_kfac_without_dense_factors(monkeypatch):
    """V = 50,000: A stays 1-D and neither one-hot activations nor V x V are formed."""
    def refuse(*args, **kw):
        raise AssertionError("dense one-hot activations formed")

    monkeypatch.setattr(EmbeddingAdapter, "activations", refuse)
    torch.set_default_dtype(torch.float32)
    Vb, Db, Tb, Nb = 50_000, 32, 16, 8
    model = extend(nn.Sequential(nn.Embedding(Vb, Db, padding_idx=0), nn.Flatten(), nn.Linear(Tb * Db, 5)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, Vb, (Nb, Tb)), torch.randint(0, 5, (Nb,))
    with curvature(KFAC(fisher_type="mc")):
        loss_fn(model(x), y).backward()
    A, G = model[0].weight.kfac
    assert A.shape == (Vb,) and G.shape == (Db, Db)
    torch.testing.assert_close(A.sum(), torch.tensor((x != 0).sum().item() / x.numel()))
