"""Loss adapters: type-2 square roots and MC samples against torch.func Hessians."""
import pytest
import torch
from torch import nn
from torch.func import hessian

from curvlib.engine.losses import loss_adapter_for


pytestmark = pytest.mark.usefixtures("float64")


def cases():
    ce_y = lambda *s: torch.randint(0, 4, s)
    return {
        "ce": (nn.CrossEntropyLoss, (5, 4), lambda: ce_y(5)),
        "ce_positions": (nn.CrossEntropyLoss, (3, 4, 2), lambda: ce_y(3, 2)),
        "ce_ignore": (nn.CrossEntropyLoss, (5, 4), lambda: torch.tensor([0, -100, 2, 3, -100])),
        "mse": (nn.MSELoss, (5, 3), lambda: torch.randn(5, 3)),
        "mse_positions": (nn.MSELoss, (3, 2, 3), lambda: torch.randn(3, 2, 3)),
        "bce": (nn.BCEWithLogitsLoss, (5, 3), lambda: torch.rand(5, 3).round()),
    }


def dense_hessian(loss_fn, f, y):
    return hessian(lambda o: loss_fn(o, y))(f).reshape(f.numel(), f.numel())


def per_sample_blocks(S):
    """``sum_k S_kn S_kn^T`` for every sample ``n`` as the block diagonal ``[N*D, N*D]``
    (samples are independent, so only these blocks of the Hessian are needed)."""
    S = S.reshape(S.shape[0], S.shape[1], -1)
    return torch.block_diag(*torch.einsum("kni,knj->nij", S, S))


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_sqrt_factors_the_loss_hessian(name, reduction):
    make, shape, make_y = cases()[name]
    loss_fn, f, y = make(reduction=reduction), torch.randn(*shape), make_y()
    S = loss_adapter_for(loss_fn).type2_cotangents(loss_fn, f, y, exact=True)
    torch.testing.assert_close(per_sample_blocks(S), dense_hessian(loss_fn, f, y))


@pytest.mark.parametrize("name", ["ce", "ce_positions", "ce_ignore", "mse", "bce"])
def test_mc_samples_estimate_the_hessian(name):
    """(``ce_positions``: classes in dimension 1 of ``[N, C, T]``, sampled with the classes last
    and returned in ``f``'s layout; ``ce_ignore``: ignored targets get zero columns.)"""
    make, shape, make_y = cases()[name]
    loss_fn, f, y = make(), torch.randn(*shape), make_y()
    S = loss_adapter_for(loss_fn).mc_cotangents(loss_fn, f, y, 40000)
    H = dense_hessian(loss_fn, f, y)
    assert (per_sample_blocks(S) - H).norm() / H.norm() < 0.03


def test_nll_on_log_probs_gives_the_softmax_fisher():
    f, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    nll = nn.NLLLoss()
    S = loss_adapter_for(nll).type2_cotangents(nll, f.log_softmax(1), y, exact=True)
    # back-propagated through log_softmax, the NLL Fisher is the CE Hessian
    J = torch.func.jacrev(lambda o: o.log_softmax(1))(f).reshape(f.numel(), f.numel())
    S = (S.reshape(S.shape[0], -1) @ J).reshape(S.shape)
    torch.testing.assert_close(per_sample_blocks(S), dense_hessian(nn.CrossEntropyLoss(), f, y))
    with pytest.raises(ValueError, match="log-probabilities"):
        loss_adapter_for(nll).type2_cotangents(nll, f, y, exact=True)


@pytest.mark.parametrize("loss_fn, target", [
    (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 4, (n,))),
    (nn.MSELoss(), lambda n: torch.randn(n, 4)),
    (nn.BCEWithLogitsLoss(), lambda n: torch.rand(n, 4).round()),
])
def test_mc_draws_come_from_the_context_generator(loss_fn, target):
    """``curvature(..., generator=g)`` draws the MC targets from ``g``: the same generator state
    gives the same factors whatever the global RNG did in between (checkpoint/resume relies on it)."""
    from curvlib import curvature, extend
    from curvlib.extensions import KFAC

    model = extend(nn.Sequential(nn.Linear(3, 4)))
    loss_fn = extend(loss_fn)
    x, y = torch.randn(8, 3), target(8)
    out = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(7)
        with curvature(KFAC(fisher_type="mc", mc_samples=3), generator=gen):
            loss_fn(model(x), y).backward()
        out.append(model[0].weight.kfac[0].clone())
    assert torch.equal(out[0], out[1])
    gen = torch.Generator().manual_seed(8)
    with curvature(KFAC(fisher_type="mc", mc_samples=3), generator=gen):
        loss_fn(model(x), y).backward()
    assert not torch.equal(out[0], model[0].weight.kfac[0])


def test_sample_categorical_draws_each_class_with_its_probability():
    """Inverse-CDF draws: class frequencies of 200,000 draws per row pass a chi-square test
    against the probabilities (exact zeros first, inside and last), and a class of probability 0
    is never drawn."""
    from scipy.stats import chisquare

    from curvlib.engine.losses import sample_categorical

    p = torch.tensor([[0.0, 0.1, 0.2, 0.0, 0.3, 0.4, 0.0],
                      [0.5, 0.0, 0.0, 0.25, 0.125, 0.125, 0.0],
                      [1 / 7] * 7])
    n = 200_000
    draws = sample_categorical(p, n, torch.Generator().manual_seed(0))
    assert draws.shape == (3, n) and draws.dtype == torch.int64
    counts = torch.stack([torch.bincount(d, minlength=7) for d in draws])
    assert (counts[p == 0] == 0).all()
    for c, q in zip(counts, p):
        keep = q > 0
        assert chisquare(c[keep].numpy(), (n * q[keep]).numpy()).pvalue > 1e-3


def test_sample_categorical_follows_its_generator():
    from curvlib.engine.losses import sample_categorical

    p = torch.randn(4, 9).softmax(-1)
    a, b = (sample_categorical(p, 50, torch.Generator().manual_seed(3)) for _ in range(2))
    torch.manual_seed(1)
    c = sample_categorical(p, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, sample_categorical(p, 50, torch.Generator().manual_seed(4)))


def test_sample_categorical_clamps_to_the_last_class_of_positive_probability(monkeypatch):
    """A uniform that rounds up to the cumsum's total (``u c_C = c_C``) lands past the last
    class: the draw is the last class of positive probability, not the last class (here of
    probability 0)."""
    from curvlib.engine.losses import sample_categorical

    p = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert sample_categorical(p, 2).tolist() == [[1, 1], [3, 3]]


def test_sample_categorical_never_draws_a_zero_class_in_float32():
    """Float32 over a 50k vocabulary (the cumsum rounds): zeros spread over the classes,
    the last ones included, are never drawn."""
    from curvlib.engine.losses import sample_categorical

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50_000, generator=g, dtype=torch.float32)
    logits[:, ::7] = -float("inf")
    logits[:, -100:] = -float("inf")
    p = logits.softmax(-1)
    draws = sample_categorical(p, 64, g)
    assert (p.gather(1, draws) > 0).all()


def test_nll_mc_samples_estimate_the_softmax_fisher():
    f, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    nll = nn.NLLLoss()
    S = loss_adapter_for(nll).mc_cotangents(nll, f.log_softmax(1), y, 40000)
    J = torch.func.jacrev(lambda o: o.log_softmax(1))(f).reshape(f.numel(), f.numel())
    S = (S.reshape(S.shape[0], -1) @ J).reshape(S.shape)
    H = dense_hessian(nn.CrossEntropyLoss(), f, y)
    assert (per_sample_blocks(S) - H).norm() / H.norm() < 0.03


def test_mc_columns_do_not_depend_on_the_memory_layout_of_the_logits():
    """A language model's ``[N, C, T]`` logits are a transposed ``[N, T, C]``: the same draws
    (same generator state) and columns as from the contiguous copy, in ``f``'s shape."""
    loss_fn = nn.CrossEntropyLoss()
    f = torch.randn(3, 5, 6).transpose(1, 2)  # [N, C=6, T=5]
    y = torch.randint(0, 6, (3, 5))
    S_t, S_c = (loss_adapter_for(loss_fn).mc_cotangents(loss_fn, g, y, 4, torch.Generator().manual_seed(0))
                for g in (f, f.contiguous()))
    assert S_t.shape == (4, 3, 6, 5)
    torch.testing.assert_close(S_t, S_c, rtol=0, atol=0)
