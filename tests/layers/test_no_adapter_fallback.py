"""A parameter used through an operation no rule covers (PReLU's slope through torch.prelu): the
curvature backward warns naming the parameter and the operation, the parameter gets no curvature,
and the optimizers move it by the plain gradient. Until issue 21 this was checked on LSTM / GRU,
which now have an adapter (tests/layers/test_recurrent.py), and the warning came at extend."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.optim import NaturalGradient


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.act, self.head = nn.Embedding(7, 4), nn.PReLU(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.emb(x).mean(1)))


def test_module_without_adapter_warns_and_falls_back_to_the_gradient():
    model = extend(Classifier())
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match=r"parameter 'act.weight' reaches the loss through torch.prelu, which no "
                                         r"curvature rule covers.*optimizers move a parameter without curvature by "
                                         r"the plain gradient"):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    assert not hasattr(model.act.weight, "kfac")
    assert hasattr(model.emb.weight, "kfac") and hasattr(model.head.weight, "kfac")
    # one optimizer step: the PReLU slope moves by -lr * grad, the others do not
    lr = 0.1
    opt = NaturalGradient(model.parameters(), lr=lr, curvature="kfac", fisher_type="type-2", damping=1e-2,
                          damping_mode="exact", T_cov=1, T_inv=1, kl_clip=None, momentum=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with opt.capture():
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    torch.testing.assert_close(model.act.weight.detach(), before["act.weight"] - lr * grads["act.weight"])
    assert not torch.allclose(model.head.weight, before["head.weight"] - lr * grads["head.weight"])
