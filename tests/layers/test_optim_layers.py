"""One NaturalGradient step on the new layers follows docs/design.md's reference semantics:
``-lr (C_p + damping I)^-1 p.grad`` with ``C_p`` the dense matrix of the factor forms."""
import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient

pytestmark = pytest.mark.usefixtures("float64")
LR, LAM = 0.5, 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 6, 2, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln(self.emb(x)).transpose(1, 2)
        return self.head(torch.tanh(self.conv(h)).mean(-1))


def dense(factors):
    if len(factors) == 1:
        return torch.block_diag(*factors[0]) if factors[0].dim() == 3 else factors[0]
    F1, F2 = factors
    if F1.dim() == 3:
        return torch.block_diag(*[torch.kron(a, b) for a, b in zip(F1, F2)])
    as_mat = lambda F: torch.diag(F) if F.dim() == 1 else F  # noqa: E731
    return torch.kron(as_mat(F1), as_mat(F2))


class AttentionNet(nn.Module):
    """Cross-attention (in_proj in the block form, in_proj_bias [G [3, E, E]]) and a grouped
    transposed convolution."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.convt = nn.ConvTranspose1d(4, 6, 2, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, z):
        q, m = z[:, :3], z[:, 3:]
        h = self.att(q, m, m, need_weights=False)[0].transpose(1, 2)
        return self.head(torch.tanh(self.convt(h)).mean(-1))


@pytest.mark.parametrize("make", [Net, AttentionNet])
def test_kfac_step_on_embedding_norm_and_grouped_conv(make):
    model, loss_fn = extend(make()), extend(nn.CrossEntropyLoss())
    x = torch.randint(0, 11, (5, 6)) if make is Net else torch.randn(5, 7, 4)
    y = torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradient(model.parameters(), lr=LR, curvature="kfac", fisher_type="type-2", damping=LAM,
                          damping_mode="exact", T_cov=1, T_inv=1, kl_clip=None, momentum=0.0, weight_decay=0.0)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    opt.step()
    forms = {}
    for p, b in zip(model.parameters(), before):
        C = dense(p.kfac)
        forms[tuple(f.dim() for f in p.kfac)] = True
        step = torch.linalg.solve(C + LAM * torch.eye(C.shape[0]), p.grad.flatten())
        torch.testing.assert_close((p.detach() - b).flatten(), -LR * step)
    if make is Net:
        assert (1, 2) in forms and (3, 3) in forms  # the diagonal and the block form took part
    else:
        assert (3, 3) in forms and (3,) in forms  # block-form weights and the in_proj_bias
