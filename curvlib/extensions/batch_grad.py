"""Per-sample gradients ``p.grad_batch`` ``[N, *p.shape]`` (BackPACK's ``BatchGrad``).

From the captures of the actual backward (source ``"grad"``, no extended loss and no extra
backprop needed), with the per-position factorisation of the layer adapters::

    right side (Linear, Conv):  X_n = sum_t s_{n,t} a_{n,t}^T        (W viewed [D_s, D_a])
    left side (ConvTranspose):  X_n = sum_t a_{n,t} s_{n,t}^T        (W viewed [D_a, D_s])
    bias:                       x_n = sum_t s'_{n,t}

BackPACK's scaling: ``sum_n X_n = p.grad`` (``X_n`` includes the ``1/N`` of a mean
reduction). For ``T = 1`` (Linear without weight sharing) ``X_n = s_n a_n^T`` is one
broadcasting multiply per layer; for ``T > 1`` one ``bmm`` over the batch.

Speed: writing ``N * p.numel()`` numbers is memory bound, and on CPU a fresh large tensor
costs more than the writes themselves (the pages of a new ``mmap`` are faulted in and zeroed
by the kernel, ~12x the cost of the multiply for a 784x256 layer at N = 128). With
``reuse_buffers=True`` the previous ``p.grad_batch`` is overwritten in place when nothing
but ``p`` refers to it (no other Python reference, view or NumPy array sharing its
memory, see :func:`reusable_buffer`): results a user kept are not touched.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Sequence

import torch
from torch import Tensor, nn

from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.factors import outer_sum
from curvlib.extensions.base import Extension


def _storage_use_count(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _attr_refcount(obj: object, name: str) -> int:
    old = obj.__dict__.get(name)
    return sys.getrefcount(old)


class _Holder:
    pass


def _calibrate():
    """Reference and storage use counts of a tensor held by one attribute only, measured
    through the same code paths as :func:`reusable_buffer` (robust to interpreter changes)."""
    h = _Holder()
    h.t = torch.empty(1)
    return _attr_refcount(h, "t"), _storage_use_count(h.t)


_EXCLUSIVE_REFCOUNT, _EXCLUSIVE_USE_COUNT = _calibrate()


def reusable_buffer(param: nn.Parameter, savefield: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """``param.<savefield>`` if it can be overwritten safely, else a new empty tensor.

    Reused only if it has ``shape`` and ``like``'s dtype and device, owns its whole
    contiguous storage, and ``param`` is the only holder: no other Python reference to it
    (reference count) and no other tensor or NumPy array sharing its storage (storage use
    count). Not detected: a kept ``untyped_storage()`` object or raw ``data_ptr``.
    """
    shape = torch.Size(shape)
    old = param.__dict__.get(savefield)
    if not (
        isinstance(old, Tensor)
        and type(old) is Tensor
        and old.shape == shape
        and old.dtype == like.dtype
        and old.device == like.device
        and not old.requires_grad
        and old.is_contiguous()
        and old.storage_offset() == 0
        and old.untyped_storage().nbytes() == old.numel() * old.element_size()
    ):
        return like.new_empty(shape)
    del old
    if (
        _attr_refcount(param, savefield) <= _EXCLUSIVE_REFCOUNT
        and _storage_use_count(param.__dict__[savefield]) <= _EXCLUSIVE_USE_COUNT
    ):
        return param.__dict__[savefield]
    return like.new_empty(shape)


class BatchGrad(Extension):
    """Per-sample gradients ``p.grad_batch`` ``[N, *p.shape]``, ``sum_n p.grad_batch[n] = p.grad``.

    Scaling (BackPACK's ``BatchGrad``): ``p.grad_batch[n]`` is sample ``n``'s contribution to
    ``p.grad`` of this backward, so with ``reduction="mean"`` it includes the ``1/N``
    (``N * p.grad_batch[n]`` is the gradient of the sample's own loss). Computed from the output
    gradients of the ordinary backward: no extended loss and no ``fisher_type`` needed.

    Args:
        reuse_buffers: overwrite the previous ``p.grad_batch`` in place when nothing else
            refers to it (see module docstring); ``False`` always allocates.

    Exactly when a buffer is reused (:func:`reusable_buffer`): ``reuse_buffers=True`` and the
    previous ``p.grad_batch`` is a plain ``torch.Tensor`` (no subclass, no ``requires_grad``)
    with the new shape, dtype and device, contiguous, at storage offset 0 and spanning its
    whole storage; the attribute ``p.grad_batch`` is the only Python reference to it (CPython
    reference count, compared with that of a tensor held by one attribute, measured at
    import); and no other tensor or array shares its storage -- no view, ``.numpy()`` array,
    ``torch.from_numpy`` / DLPack alias (storage use count, ``torch._C._storage_Use_Count``:
    the count PyTorch's own ``AccumulateGrad`` checks before accumulating into ``p.grad`` in
    place). Not detected: a kept ``p.grad_batch.untyped_storage()`` object or raw
    ``data_ptr()``. Otherwise a new tensor is allocated. No public PyTorch mechanism gives
    this guarantee: on ``benchmarks/bench_batch_grad.py`` (MLP 784-256-128-10, N = 128, two
    shared CPU threads) a step takes 77 ms with reuse and 229 ms without (BackPACK: 164 ms),
    because a fresh 115 MiB tensor is page-faulted and zeroed by the kernel.

    Finiteness is checked on the (small) captured ``s`` and ``a`` instead of the result.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import BatchGrad
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(BatchGrad()):
        ...     nn.CrossEntropyLoss()(model(x), y).backward()  # a plain loss is enough
        >>> W = model[0].weight                  # [3, 4]
        >>> W.grad_batch.shape
        torch.Size([8, 3, 4])
        >>> torch.allclose(W.grad_batch.sum(0), W.grad, atol=1e-6)
        True
    """

    savefield = "grad_batch"
    #: several backwards in one context: the per-sample gradients of all micro-batches, in order
    accumulation = "cat"
    #: the engine skips its NaN/Inf scan of the (large) result; compute() checks the inputs
    check_finite = False

    def __init__(self, reuse_buffers: bool = True):
        super().__init__("empirical")
        self.reuse_buffers = bool(reuse_buffers)

    @property
    def source(self) -> Source:
        return "grad"

    def sources(self):
        return {"grad"}

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        out = {}
        for name, p in capture.params.items():
            _, N = capture.finite_inputs(name, "grad")
            shape = (N, *p.shape)
            buf = reusable_buffer(p, self.savefield, shape, p) if self.reuse_buffers else None
            out[name] = capture.per_sample_grads_into(name, "grad", buf)
        return out

    def __repr__(self) -> str:
        return f"BatchGrad(reuse_buffers={self.reuse_buffers})"


def per_sample_into(capture: LayerCapture, name: str, source: Source, out=None) -> Tensor:
    """Former name of :meth:`LayerCapture.per_sample_grads_into <curvlib.engine.capture.LayerCapture.per_sample_grads_into>`
    (the per-sample gradient assembly lives in the engine)."""
    return capture.per_sample_grads_into(name, source, out)

__all__ = ["BatchGrad", "outer_sum", "per_sample_into", "reusable_buffer"]
