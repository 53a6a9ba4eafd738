"""``max_factor_dim`` (docs/design.md §2): a Kronecker factor side above it is stored 1-D, its
diagonal, equal (float64) to the diagonal of the dense factor; EKFAC's ``S`` with such a side is
``diag(Q^T F Q)`` of the dense torch.func block for the identity basis on that side; the Kronecker
SVD extensions and the block form refuse it, naming the layer; an extension restricted to some
parameters builds nothing for the others."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine import factors
from curvlib.extensions import EKFAC, KFAC, KFACCorrected, KPSVD
from tests.utils import dense_ggn, param_slices

pytestmark = pytest.mark.usefixtures("float64")


class TokenModel(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Tanh -> (Linear called ``calls`` times) -> vocabulary head."""

    def __init__(self, V=20, D=6, H=12, calls=1):
        super().__init__()
        self.emb, self.lin, self.norm = nn.Embedding(V, D), nn.Linear(D, H), nn.LayerNorm(H)
        self.mid, self.head, self.calls = nn.Linear(H, H), nn.Linear(H, V), calls

    def forward(self, x):
        h = self.norm(self.lin(self.emb(x))).tanh()
        for _ in range(self.calls):
            h = self.mid(h).tanh()
        return self.head(h).flatten(0, 1)


def capture_kfac(model, loss_fn, x, y, seed=1, **kw):
    torch.manual_seed(seed)
    with curvature(KFAC(**kw)):
        loss_fn(model(x), y).backward()
    return {n: [f.clone() for f in p.kfac] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_diagonal_side_is_the_dense_factors_diagonal(fisher_type, kfac_approx, calls):
    """Sides above 10 (the head's 20 outputs, the LayerNorm's and the middle layer's 12) are 1-D and
    equal the diagonal of the dense factor; sides <= 10 are the dense factor unchanged."""
    model = extend(TokenModel(calls=calls))
    if kfac_approx == "reduce":  # (refused for an Embedding with several tokens per sample)
        model.emb.weight.requires_grad_(False)
    loss_fn = extend(nn.CrossEntropyLoss())
    x = torch.randint(0, 20, (4, 3))
    y = torch.randint(0, 20, (12,))
    kw = dict(fisher_type=fisher_type, kfac_approx=kfac_approx)
    dense = capture_kfac(model, loss_fn, x, y, max_factor_dim=None, **kw)
    small = capture_kfac(model, loss_fn, x, y, max_factor_dim=10, **kw)
    n_diag = 0
    for name in dense:
        assert len(small[name]) == len(dense[name])
        for F, Fd in zip(small[name], dense[name]):
            side = F.shape[0]
            if Fd.dim() == 2 and side > 10:
                assert F.dim() == 1, (name, F.shape)
                torch.testing.assert_close(F, Fd.diagonal(), rtol=1e-12, atol=1e-14)
                n_diag += 1
            else:
                torch.testing.assert_close(F, Fd, rtol=1e-12, atol=1e-14)
    # head weight G (20) and A (12) and bias, mid weight G, A and bias, lin weight G and bias, norm
    # weight and bias (12 each); the Embedding's token factor is 1-D either way
    assert n_diag == 10 and len(dense) == 9 - (kfac_approx == "reduce")


def test_diagonal_cot_side_against_the_dense_block():
    """Independent reference: for type-2 the last layer's ``G`` is its bias's exact GGN block
    (``sum_n J^T H J`` with ``J = I``), so the 1-D ``G`` of the weight and bias equals that block's
    diagonal from torch.func."""
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 12)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(7, 4), torch.randint(0, 12, (7,))
    with curvature(KFAC(fisher_type="type-2", max_factor_dim=8)):
        loss_fn(model(x), y).backward()
    G, A = model[2].weight.kfac
    assert G.shape == (12,) and A.shape == (5, 5)
    sl = param_slices(model)[3]
    ref = dense_ggn(model, loss_fn, x, y)[sl, sl].diagonal()
    torch.testing.assert_close(G, ref)
    torch.testing.assert_close(model[2].bias.kfac[0], ref)


def test_ekfac_with_a_diagonal_side():
    """EKFAC with the head's 12 outputs above ``max_factor_dim=8``: ``Q0 = ones(12)`` (identity),
    ``Q1`` the eigenvectors of the dense ``A``, and ``S = diag(Q^T F Q)`` for ``Q = kron(I, Q1)`` and
    ``F`` the dense GGN block."""
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 12)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(7, 4), torch.randint(0, 12, (7,))
    with curvature(EKFAC(fisher_type="type-2", max_factor_dim=8), KFAC(fisher_type="type-2", max_factor_dim=8)):
        loss_fn(model(x), y).backward()
    F = dense_ggn(model, loss_fn, x, y)
    sl = param_slices(model)
    (Q0, Q1), S = model[2].weight.ekfac
    assert Q0.shape == (12,) and torch.equal(Q0, torch.ones(12)) and Q1.shape == (5, 5)
    A = model[2].weight.kfac[1]
    torch.testing.assert_close(Q1.T @ A @ Q1, torch.diag(torch.diagonal(Q1.T @ A @ Q1)), atol=1e-12, rtol=0)
    Q = torch.kron(torch.eye(12), Q1)
    torch.testing.assert_close(S.flatten(), torch.diagonal(Q.T @ F[sl[2], sl[2]] @ Q))
    (Qb,), Sb = model[2].bias.ekfac
    torch.testing.assert_close(Sb, torch.diagonal(F[sl[3], sl[3]]))
    assert torch.equal(Qb, torch.ones(12))


@pytest.mark.parametrize("ext", [KPSVD, KFACCorrected])
def test_kronecker_svd_extensions_refuse_a_large_side(ext):
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 12)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(7, 4), torch.randint(0, 12, (7,))
    with pytest.raises(NotImplementedError, match=r"Linear\(in_features=5, out_features=12.*max_factor_dim=8"):
        with curvature(ext(fisher_type="type-2", max_factor_dim=8)):
            loss_fn(model(x), y).backward()
    with curvature(ext(fisher_type="type-2", max_factor_dim=None)):  # no limit: as before
        loss_fn(model(x), y).backward()
    assert model[2].weight.__dict__[ext.savefield][0][0].shape == (12, 12)


def test_block_form_refuses_a_large_side():
    model = extend(nn.Sequential(nn.Conv2d(4, 12, 3, groups=2), nn.Flatten(), nn.Linear(48, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(3, 4, 4, 4), torch.randint(0, 3, (3,))
    with pytest.raises(NotImplementedError, match=r"Conv2d.*block form over 2 groups"):
        with curvature(KFAC(fisher_type="mc", max_factor_dim=5)):
            loss_fn(model(x), y).backward()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", True])
def test_invalid_max_factor_dim(bad):
    with pytest.raises(ValueError, match="max_factor_dim"):
        KFAC(max_factor_dim=bad)
    with pytest.raises(ValueError, match="max_factor_dim"):
        KPSVD(max_factor_dim=bad)


def test_restricted_extension_builds_nothing_for_other_parameters(monkeypatch):
    """``KFAC().restrict(params)``: the other layers' factors are never computed (not only not
    stored): neither the column reduction nor ``compute`` sees their parameters."""
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 300)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(7, 4), torch.randint(0, 300, (7,))
    seen = []
    for fn in ("kfac_cot_factor", "kfac_act_factor"):
        orig = getattr(factors, fn)

        def spy(t, *a, _orig=orig, **k):
            out = _orig(t, *a, **k)
            seen.append(out.shape[-1])
            return out

        monkeypatch.setattr(factors, fn, spy)
    for fisher_type in ("mc", "type-2", "empirical"):
        seen.clear()
        with curvature(KFAC(fisher_type=fisher_type).restrict(model[0].parameters())):
            loss_fn(model(x), y).backward()
        assert [f.shape for f in model[0].weight.kfac] == [(5, 5), (4, 4)]
        assert "kfac" not in model[2].weight.__dict__ and "kfac" not in model[2].bias.__dict__
        assert seen and 300 not in seen, (fisher_type, seen)
