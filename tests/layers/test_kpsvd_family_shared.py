"""The KPSVD family on layers called several times before one backward: a grouped convolution
(KPSVD: the block form, each group's terms the best Kronecker approximation of that group's block
of the dense torch.func GGN; KFACCorrected: refused, naming the layer) and one
nn.MultiheadAttention module called twice (KFACCorrected: the first term the KFAC of the calls'
stacked positions, the correction the best Kronecker approximation of the dense residual)."""
import copy

import pytest
import torch
from einops import rearrange
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, KFACCorrected, KPSVD
from tests.layers.test_attention import CASES, TwiceNet, data
from tests.layers.test_grouped_kpsvd import best_terms
from tests.utils import dense_ggn

pytestmark = pytest.mark.usefixtures("float64")


class GroupedTwice(nn.Module):
    """A grouped Conv2d(4, 6, 3, groups=2) called on ``x`` and ``x / 2`` before one backward."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(4, 6, 3, groups=2), nn.Linear(6 * 4, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1)) + self.head(self.conv(0.5 * x).flatten(1))


def grouped_setup():
    model = GroupedTwice()
    plain = copy.deepcopy(model)
    return extend(model), plain, torch.randn(5, 4, 4, 4), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("rank", [1, 2])
def test_kpsvd_grouped_conv_called_twice_is_the_best_per_group_approximation(rank):
    model, plain, x, y = grouped_setup()
    ext = KPSVD(fisher_type="type-2", rank=rank, method="lanczos" if rank > 1 else "power", tol=1e-12, maxiter=500)
    with curvature(ext):
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y)
    W, B = model.conv.weight, 2
    m, n = W.shape[0] // B, W[0].numel()
    for G, A in W.kpsvd:
        assert G.shape == (B, m, m) and A.shape == (B, n, n)
    for b in range(B):
        s = slice(b * m * n, (b + 1) * m * n)
        torch.testing.assert_close(sum(torch.kron(G[b], A[b]) for G, A in W.kpsvd), best_terms(ggn[s, s], m, n, rank))


def test_kfac_corrected_grouped_conv_called_twice_is_refused():
    model, _, x, y = grouped_setup()
    with pytest.raises(NotImplementedError, match=r"grouped Conv2d\(4, 6.*called 2 times.*use KPSVD"):
        with curvature(KFACCorrected(fisher_type="type-2")):
            extend(nn.CrossEntropyLoss())(model(x), y).backward()


@pytest.mark.parametrize("case", [CASES[0], CASES[1]])
def test_kfac_corrected_attention_called_twice(case):
    """Self-attention called twice: ``in_proj_weight``'s first term is the KFAC of one Linear over
    the stacked positions of both calls (its diagonal blocks are ``p.kfac``'s block form, whose ``A``
    is the same for q, k, v), and ``kron(S, R)`` the best Kronecker approximation of the dense block
    minus ``kron(G, A)``; the other weights likewise."""
    net = TwiceNet(*case)
    plain = copy.deepcopy(net)
    x, y = data()
    extend(net)
    with curvature(KFACCorrected(fisher_type="type-2", tol=1e-12, maxiter=500), KFAC(fisher_type="type-2")):
        extend(nn.CrossEntropyLoss())(net(x), y).backward()
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y)
    params, i = dict(net.named_parameters()), 0
    for name, p0 in plain.named_parameters():
        p, s = params[name], slice(i, i + p0.numel())
        i += p0.numel()
        block = ggn[s, s]
        if p.ndim == 1:
            torch.testing.assert_close(p.kfac_corrected[0][0], block)
            continue
        (G, A), (S, R) = p.kfac_corrected
        d0, d1 = p.shape
        if name == "att.in_proj_weight":
            Gb, Ab = p.kfac
            E = d1
            for b in range(3):
                torch.testing.assert_close(G[b * E:(b + 1) * E, b * E:(b + 1) * E], Gb[b])
                torch.testing.assert_close(A, Ab[b])
        else:
            torch.testing.assert_close(G, p.kfac[0])
            torch.testing.assert_close(A, p.kfac[1])
        R_ = rearrange(block - torch.kron(G, A), "(i a) (k b) -> (i k) (a b)", i=d0, a=d1, k=d0, b=d1)
        U, sv, Vh = torch.linalg.svd(R_)
        best = sv[0] * torch.kron(U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1))
        torch.testing.assert_close(torch.kron(S, R), best)
