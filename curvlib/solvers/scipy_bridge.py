"""Bridges between curvlib operators (callables on lists of tensors) and scipy ``LinearOperator``s."""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from .structure import Structure, TensorOrList

__all__ = ["to_scipy", "from_scipy"]


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def to_scipy(
    operator: Callable[[TensorOrList], TensorOrList],
    shapes,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    adjoint: Optional[Callable[[TensorOrList], TensorOrList]] = None,
) -> LinearOperator:
    """Wrap ``operator`` as a ``scipy.sparse.linalg.LinearOperator`` of shape ``[n, n]``.

    Args:
        operator: callable on a list of tensors with ``shapes`` (or on one tensor when ``shapes``
            is a single shape), returning the same structure.
        shapes: one shape (tuple of ints / ``torch.Size``) or a list of shapes; ``n`` = total numel.
        dtype, device: tensors handed to ``operator``; the numpy dtype follows ``dtype``.
        adjoint: ``rmatvec`` operator (default: ``operator`` itself, i.e. symmetric, as F / GGN).
    """
    s = Structure.from_shapes(shapes)
    n = s.numel

    def wrap(fn, name):
        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x).reshape(-1)
            v = torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)
            y = s.flatten(fn(s.unflatten(v)), f"output of {name}")
            return y.detach().cpu().numpy()

        return mv

    mv = wrap(operator, "operator")
    rmv = wrap(adjoint, "adjoint") if adjoint is not None else mv
    return LinearOperator((n, n), matvec=mv, rmatvec=rmv, dtype=_np_dtype(dtype))


def from_scipy(
    linop: LinearOperator,
    shapes,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Callable[[TensorOrList], TensorOrList]:
    """A curvlib-style callable ``x -> linop @ x`` on a list of tensors with ``shapes`` (or one
    tensor for a single shape). Outputs take ``dtype``/``device`` (default: those of the input)."""
    s = Structure.from_shapes(shapes)
    if tuple(linop.shape) != (s.numel, s.numel):
        raise ValueError(f"from_scipy: linop has shape {linop.shape} but shapes hold {s.numel} entries.")

    def op(x: TensorOrList) -> TensorOrList:
        v = s.flatten(x, "input")
        y = np.asarray(linop.matvec(v.detach().cpu().numpy())).reshape(-1)
        out = torch.as_tensor(y, dtype=dtype or v.dtype, device=device or v.device)
        return s.unflatten(out)

    return op
