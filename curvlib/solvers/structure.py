"""Tensor-or-list-of-tensors structures, flattened to one vector and back.

Solvers accept either one tensor of any shape or a list of tensors (one per parameter);
internally they work on the flat vector ``torch.cat([t.flatten() for t in tensors])``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

TensorOrList = Union[Tensor, Sequence[Tensor]]
ShapeLike = Union[torch.Size, Sequence[int]]

__all__ = ["flatten_list", "unflatten", "Structure", "BatchedStructure", "TensorOrList"]


def flatten_list(tensors: TensorOrList) -> Tensor:
    """Concatenate tensors into one vector ``[sum numel]`` (row-major flatten of each)."""
    if isinstance(tensors, Tensor):
        return tensors.reshape(-1)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("flatten_list: got an empty list of tensors; pass at least one tensor.")
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, shapes: Sequence[ShapeLike]) -> List[Tensor]:
    """Split a vector ``[sum prod(shape)]`` into a list of tensors with the given shapes."""
    shapes = [torch.Size(s) for s in shapes]
    numels = [math.prod(s) for s in shapes]
    if vector.dim() != 1 or vector.numel() != sum(numels):
        raise ValueError(
            f"unflatten: vector has shape {tuple(vector.shape)} but the shapes {list(map(tuple, shapes))} "
            f"need a 1-d vector of {sum(numels)} entries."
        )
    return [p.reshape(s) for p, s in zip(torch.split(vector, numels), shapes)]


def _is_single_shape(shapes) -> bool:
    """True when ``shapes`` is one shape (torch.Size / tuple of ints), False for a list of shapes."""
    if isinstance(shapes, torch.Size):
        return True
    shapes = tuple(shapes)
    return all(isinstance(s, int) for s in shapes)


class Structure:
    """Shapes of a tensor (``is_tensor=True``) or of a list of tensors, with flatten/unflatten.

    ``Structure.of(x)`` records ``x``'s layout; ``flatten(y)`` checks that ``y`` has the same layout
    and returns the vector ``[numel]``; ``unflatten(vec)`` rebuilds the tensor or list.
    """

    def __init__(self, shapes: Sequence[ShapeLike], is_tensor: bool):
        self.shapes = [torch.Size(s) for s in shapes]
        self.is_tensor = is_tensor
        self.numel = sum(math.prod(s) for s in self.shapes)

    @classmethod
    def of(cls, x: TensorOrList, name: str = "input") -> "Structure":
        if isinstance(x, Tensor):
            return cls([x.shape], True)
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
            return cls([t.shape for t in x], False)
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors, got {type(x).__name__}.")

    @classmethod
    def from_shapes(cls, shapes) -> "Structure":
        """One shape (tuple of ints / torch.Size) -> tensor structure; a list of shapes -> list."""
        if _is_single_shape(shapes):
            return cls([tuple(shapes)], True)
        return cls(list(shapes), False)

    def flatten(self, x: TensorOrList, name: str = "tensor") -> Tensor:
        if isinstance(x, Tensor):
            if not self.is_tensor or x.shape != self.shapes[0]:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, expected {self._describe()}."
                )
            return x.reshape(-1)
        xs = list(x)
        if self.is_tensor or [t.shape for t in xs] != self.shapes:
            got = [tuple(t.shape) for t in xs]
            raise ValueError(f"{name} has shapes {got}, expected {self._describe()}.")
        return torch.cat([t.reshape(-1) for t in xs])

    def unflatten(self, vec: Tensor) -> TensorOrList:
        if self.is_tensor:
            return vec.reshape(self.shapes[0])
        return unflatten(vec, self.shapes)

    def wrap(self, fn: Callable, name: str = "operator") -> Callable[[Tensor], Tensor]:
        """Turn ``fn`` acting on this structure into a function on flat vectors ``[numel]``."""

        def flat_fn(vec: Tensor) -> Tensor:
            return self.flatten(fn(self.unflatten(vec)), name=f"output of {name}")

        return flat_fn

    def _describe(self) -> str:
        if self.is_tensor:
            return f"one tensor of shape {tuple(self.shapes[0])}"
        return f"a list of tensors with shapes {[tuple(s) for s in self.shapes]}"


class BatchedStructure:
    """A batch of independent vectors: the leading ``batch_dims`` dimensions of a tensor (or of
    every tensor of a list, the same for all) index the batch, the rest is one :class:`Structure`.

    ``flatten(x)`` returns the matrix ``[B, numel]`` (``B = prod(batch_shape)``, row ``b`` the
    flattened vector of system ``b``); ``unflatten`` inverts it. ``batch_dims=0`` is one system
    (``B = 1``).
    """

    def __init__(self, batch_shape: ShapeLike, inner: Structure):
        self.batch_shape = torch.Size(batch_shape)
        self.batch = math.prod(self.batch_shape)
        self.inner = inner
        self.numel = inner.numel

    @classmethod
    def of(cls, x: TensorOrList, batch_dims: int = 0, name: str = "input") -> "BatchedStructure":
        if not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"batch_dims must be an int >= 0, got {batch_dims!r}.")
        s = Structure.of(x, name)
        if any(len(shape) < batch_dims for shape in s.shapes):
            raise ValueError(f"{name}: every tensor needs at least batch_dims={batch_dims} dimensions.")
        batch = s.shapes[0][:batch_dims]
        if any(shape[:batch_dims] != batch for shape in s.shapes):
            raise ValueError(
                f"{name}: all tensors must share the leading batch shape, got {[tuple(t[:batch_dims]) for t in s.shapes]}."
            )
        return cls(batch, Structure([shape[batch_dims:] for shape in s.shapes], s.is_tensor))

    def flatten(self, x: TensorOrList, name: str = "tensor") -> Tensor:
        B = self.batch
        if isinstance(x, Tensor):
            ok = self.inner.is_tensor and x.shape == self.batch_shape + self.inner.shapes[0]
            if not ok:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {self._describe()}.")
            return x.reshape(B, -1)
        xs = list(x)
        want = [self.batch_shape + s for s in self.inner.shapes]
        if self.inner.is_tensor or [t.shape for t in xs] != want:
            raise ValueError(f"{name} has shapes {[tuple(t.shape) for t in xs]}, expected {self._describe()}.")
        return torch.cat([t.reshape(B, -1) for t in xs], dim=1)

    def unflatten(self, X: Tensor) -> TensorOrList:
        if self.inner.is_tensor:
            return X.reshape(self.batch_shape + self.inner.shapes[0])
        numels = [math.prod(s) for s in self.inner.shapes]
        return [p.reshape(self.batch_shape + s) for p, s in zip(torch.split(X, numels, dim=1), self.inner.shapes)]

    def wrap(self, fn: Callable, name: str = "operator") -> Callable[[Tensor], Tensor]:
        """Turn ``fn`` acting on this (batched) structure into a function on ``[B, numel]``."""

        def flat_fn(X: Tensor) -> Tensor:
            return self.flatten(fn(self.unflatten(X)), name=f"output of {name}")

        return flat_fn

    def _describe(self) -> str:
        lead = f"leading batch shape {tuple(self.batch_shape)} and " if len(self.batch_shape) else ""
        return lead + self.inner._describe()


def as_shape_tuple(shapes) -> Tuple[bool, List[torch.Size]]:
    """Normalize ``shapes`` (one shape or a list) to ``(is_single, [Size, ...])``."""
    s = Structure.from_shapes(shapes)
    return s.is_tensor, s.shapes
