"""An adapted layer that takes part in no call during a captured backward gets no curvature:
warned once per layer (issue 7, item 6). ``nn.MultiheadAttention.out_proj``, applied by
``F.multi_head_attention_forward`` and never called as a module, is recorded by the attention
adapter (issue 8): no warning for it."""
import warnings

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from tests.zoo import TinyTransformer


def run(model, loss_fn, x, y):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with curvature(KFAC("type-2")):
            loss_fn(model(x), y).backward()
    return [str(w.message) for w in rec if "took part in no call" in str(w.message)]


def transformer():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MultiheadAttention / LayerNorm parameters: no adapter
        model = extend(TinyTransformer())
    return model, extend(nn.CrossEntropyLoss()), torch.randn(4, 5, 4), torch.randint(0, 3, (4,))


def test_multihead_attention_out_proj_is_not_warned_and_gets_curvature():
    model, loss_fn, x, y = transformer()
    assert run(model, loss_fn, x, y) == []
    att = model.enc.self_attn
    for p in (att.out_proj.weight, att.out_proj.bias, att.in_proj_weight, att.in_proj_bias, model.enc.linear1.weight):
        assert hasattr(p, "kfac")


def test_layer_not_reaching_the_loss_is_warned():
    torch.manual_seed(0)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = extend(Unused())
    loss_fn, x, y = extend(nn.CrossEntropyLoss()), torch.randn(5, 4), torch.randint(0, 3, (5,))
    msgs = run(model, loss_fn, x, y)
    assert len(msgs) == 1 and "'spare'" in msgs[0]
    assert run(model, loss_fn, x, y) == []  # once per layer


def test_no_warning_when_every_layer_is_called():
    """Guard: frozen layers and fully used models are not warned about."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    model[0].requires_grad_(False)
    assert run(model, extend(nn.CrossEntropyLoss()), torch.randn(5, 4), torch.randint(0, 3, (5,))) == []


@pytest.mark.parametrize("ft", ["type-2", "empirical"])
def test_transformer_layer_kfac_runs(ft):
    """Try-out on an nn.TransformerEncoderLayer: the Linear layers get factors of the right shapes."""
    model, loss_fn, x, y = transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with curvature(KFAC(ft)):
            loss_fn(model(x), y).backward()
    G, A = model.enc.linear1.weight.kfac
    assert G.shape == (16, 16) and A.shape == (8, 8)
