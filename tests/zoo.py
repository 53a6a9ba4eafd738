"""The small models and problems shared by the tests (one place; torchvision is not importable here).

Families (each a factory, so that every test gets fresh parameters):

- :data:`NETS` / :data:`LOSSES` / :func:`problem`: nets with their output dimension, for the
  exact extensions (ExactBlockFisher, BatchGrad, DiagGGN, CrossKFAC);
- :data:`MODELS` / :data:`MODEL_LOSSES` / :func:`setup`: 3-class models for GGNMP, HMP, PCHMP;
- :func:`kpsvd_nets` / :func:`kpsvd_setup`: the KPSVD / KFACCorrected models;
- :func:`mlp` / :func:`data`: the extended MLP and data of the optimizer tests;
- :class:`TinyResNet` / :class:`TinyTransformer`: stand-ins for torchvision / transformer models.
"""
from __future__ import annotations

import torch
from torch import nn

from curvlib import extend

N = 6


# ------------------------------------------------------------------ exact extensions


class Residual(nn.Module):
    """``l2(h + tanh(l1(h)))`` with ``h = tanh(l0(x))``: a functional skip connection."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.l0(x))
        h = h + torch.tanh(self.l1(h))
        return self.l2(h)


#: name -> (model factory, input shape, output dim)
NETS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (N, 5), 3),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
            nn.Flatten(), nn.Linear(8, 3),
        ),
        (N, 2, 4, 4),
        3,
    ),
    "res": (Residual, (N, 5), 3),
    # weight sharing in Linear layers (T = 2)
    "seq": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Flatten()), (N, 2, 5), 6),
    # transposed convolution: activation side on the left
    "convT": (
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)),
        (N, 2, 2, 2),
        3,
    ),
    # ... with a single input position (T = 1)
    "convT1": (
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        (N, 2, 1, 1),
        3,
    ),
}
LOSSES = {
    "ce": (nn.CrossEntropyLoss, lambda n, c: torch.randint(0, c, (n,))),
    "mse": (nn.MSELoss, lambda n, c: torch.randn(n, c)),
}


def problem(net: str, loss: str, reduction: str):
    """Extended ``(model, loss_fn, x, y)``."""
    make, shape, c = NETS[net]
    make_loss, make_y = LOSSES[loss]
    model = extend(make())
    return model, extend(make_loss(reduction=reduction)), torch.randn(*shape), make_y(shape[0], c)


# ------------------------------------------------------------------ GGNMP / HMP / PCHMP


class SkipResidual(nn.Module):
    """``h = tanh(l1(x)); h = h + l2(sigmoid(h)); out = l3(h)`` (functional skip)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = h + self.l2(torch.sigmoid(h))
        return self.l3(h)


#: name -> (model factory, input shape); 3 classes (GGNMP, HMP, PCHMP tests)
MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (6, 4)),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4), nn.Sigmoid(), nn.Linear(4, 3)
        ),
        (6, 2, 5, 5),
    ),
    "res": (SkipResidual, (6, 4)),
    "seq": (  # Linear layers with a weight-sharing dimension (T = 3)
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten(), nn.Linear(9, 3)),
        (6, 3, 4),
    ),
    "convT": (
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)),
        (5, 2, 2, 2),
    ),
}
MODEL_LOSSES = {
    "ce": (nn.CrossEntropyLoss, lambda n: torch.randint(0, 3, (n,))),
    "mse": (nn.MSELoss, lambda n: torch.randn(n, 3)),
}


def setup(model_name, loss_name, reduction="mean"):
    make, shape = MODELS[model_name]
    model = extend(make())
    make_loss, make_y = MODEL_LOSSES[loss_name]
    loss_fn = extend(make_loss(reduction=reduction))
    x = torch.randn(*shape)
    return model, loss_fn, x, make_y(shape[0])


# ------------------------------------------------------------------ KPSVD / KFACCorrected


def kpsvd_nets():
    """name -> (model factory, input shape); 3 classes. Comments: what each one covers."""
    return {
        # Linear, T = 1
        "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (8, 5)),
        # first layer's activation side (4 samples, 16 inputs) is compressed to its span
        "wide": (lambda: nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)), (4, 16)),
        # Linear with weight sharing (T = 3): cross-position terms
        "seq": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (6, 3, 5)),
        "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)), (8, 2, 4, 4)),
        "conv1d": (
            lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(9, 3)),
            (6, 2, 5),
        ),
        # activation side is the *first* factor
        "convT2d": (
            lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)),
            (6, 2, 3, 3),
        ),
    }


def kpsvd_setup(name, reduction="mean"):
    make, shape = kpsvd_nets()[name]
    model = extend(make())
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    return model, extend(nn.CrossEntropyLoss(reduction=reduction)), x, y


# ------------------------------------------------------------------ optimizers


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return extend(nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)))


def data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ stand-ins for real networks


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity, as in torchvision's BasicBlock."""

    def __init__(self, c: int, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, affine=affine)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, affine=affine)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """stem conv + BN, one residual block, global average pooling, fc."""

    def __init__(self, classes: int = 3, c: int = 4, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c, affine=affine)
        self.block = ResBlock(c, affine)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.block(x)
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` on embedded inputs, mean-pooled, linear head."""

    def __init__(self, d: int = 8, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def factor_form_net(layer: str, n: int):
    """A small classifier (3 classes) whose first layer has 1-D Kronecker factors
    (``"embedding"``: token frequencies) or block-form ones (``"grouped"``: a 2-group conv),
    and ``n`` inputs for it; seeded."""
    torch.manual_seed(0)
    if layer == "embedding":
        return nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 3)), torch.randint(0, 20, (n, 3))
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    return net, torch.randn(n, 4, 6, 6)
