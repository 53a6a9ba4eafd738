"""``torch.autocast("cpu", dtype=torch.bfloat16)``: layers compute in bfloat16, but the
factors, blocks and per-sample gradients are accumulated and returned in the parameters'
dtype (float32), usable by ``KroneckerInverse``, and close to the float32 quantities."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad, ExactBlockFisher
from curvlib.solvers import KroneckerInverse


def make():
    torch.manual_seed(1)
    return extend(
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    )


def capture(fisher_type, autocast):
    model = make()
    loss_fn = extend(nn.CrossEntropyLoss())
    torch.manual_seed(2)
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model(x), y)
    torch.manual_seed(3)
    with curvature(KFAC(fisher_type=fisher_type), BatchGrad(), ExactBlockFisher(fisher_type=fisher_type)):
        loss.backward()
    return model


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_autocast_bf16_gives_float32_quantities_close_to_float32(fisher_type):
    got, ref = capture(fisher_type, True), capture(fisher_type, False)
    for p, q in zip(got.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        for name in ("kfac", "grad_batch", "block_fisher"):
            a, b = getattr(p, name), getattr(q, name)
            for s, t in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert s.dtype == torch.float32, (name, s.dtype)
                assert rel(s, t) < 0.05, (name, rel(s, t))  # bfloat16 has 8 bits of mantissa
        assert rel(p.grad_batch.sum(0), p.grad) < 1e-2  # p.grad itself is a bfloat16 matmul
        if p.dim() > 1:
            direction = KroneckerInverse([p.kfac], damping=1e-3)(p.grad.reshape(p.shape[0], -1))
            assert direction.dtype == torch.float32 and bool(torch.isfinite(direction).all())
