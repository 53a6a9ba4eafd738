"""LSTM / GRU (fused kernels) have no adapter: extend warns naming the module, its parameters get
no curvature, and the optimizers move them by the plain gradient (README, Limitations)."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.optim import NaturalGradient


class Classifier(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(7, 4), rnn(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0][:, -1])


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_layers_warn_and_fall_back_to_the_gradient(rnn):
    model = Classifier(rnn)
    name = rnn.__name__
    with pytest.warns(UserWarning, match=rf"'rnn' \({name}\) has parameters but no layer adapter; its parameters "
                                         r"get no curvature \(optimizers fall back to the plain gradient"):
        extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    with curvature(KFAC(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    assert all(not hasattr(p, "kfac") for p in model.rnn.parameters())
    assert hasattr(model.emb.weight, "kfac") and hasattr(model.head.weight, "kfac")
    # one optimizer step: the recurrent parameters move by -lr * grad
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
    for n, p in model.rnn.named_parameters():
        torch.testing.assert_close(p.detach(), before[f"rnn.{n}"] - lr * grads[f"rnn.{n}"])
    assert not torch.allclose(model.head.weight, before["head.weight"] - lr * grads["head.weight"])
