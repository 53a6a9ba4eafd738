import pytest
import torch


def _spd(n, gen, shift=0.1, dtype=torch.float64):
    X = torch.randn(n, n + 2, generator=gen, dtype=dtype)
    return X @ X.T / (n + 2) + shift * torch.eye(n, dtype=dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def spd():
    return _spd
