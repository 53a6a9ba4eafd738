"""Small stand-ins for torchvision / transformer models (torchvision is not importable here)."""
from __future__ import annotations

import torch
from torch import nn


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
