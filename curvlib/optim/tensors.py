"""Tensor helpers of the optimizers: curvature values (a tensor or nested lists of tensors) and
finiteness checks."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

Value = Any  # a tensor or a nested list of tensors


def tree_map(fn: Callable[..., Tensor], *trees: Value) -> Value:
    """Apply ``fn`` leaf-wise to tensors in equally nested lists."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    return [tree_map(fn, *parts) for parts in zip(*trees)]


def tree_leaves(tree: Value) -> List[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    return [t for part in tree for t in tree_leaves(part)]


def same_structure(a: Value, b: Value) -> bool:
    """Equally nested, with leaves of equal shapes."""
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape for x, y in zip(la, lb))


def finite(t: Tensor) -> bool:
    """One reduction: a tensor with a NaN or Inf entry has a non-finite sum (an overflowing
    sum of finite entries is checked element-wise)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def first_nonfinite(ts: List[Tensor]) -> Optional[int]:
    """Index of the first tensor with a NaN or Inf entry (``None``: all finite): one stacked check
    of the tensors' 1-norms (a non-finite norm, or tensors of mixed dtypes, are then checked one
    by one, as an overflowing norm of finite entries is possible)."""
    if not ts:
        return None
    try:
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, 1))).all()):
            return None
    except RuntimeError:  # mixed dtypes or devices
        pass
    return next((i for i, t in enumerate(ts) if not finite(t)), None)


__all__ = ["Value", "tree_map", "tree_leaves", "same_structure", "finite", "first_nonfinite"]
