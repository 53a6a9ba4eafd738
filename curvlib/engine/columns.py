"""Back-propagation of the curvature columns from the loss input to the layer outputs.

For ``K`` output cotangents ``V [K, *f.shape]`` (the loss-Hessian square root for
``"type-2"``, sampled gradients for ``"mc"``) the engine needs ``J_l^T V_k`` at every
extended layer output ``l``: ``K`` vector-Jacobian products through the recorded graph,
one result ``[K, *output_l.shape]`` per layer.

How (measured on CPU, torch 2.13, ``benchmarks/bench_kfac.py`` and
``benchmarks/bench_cg_newton.py``; see the README's benchmark section):

- ``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward graph once on
  batched cotangents (torch's *legacy* vmap). For small activations (MLPs) that beats one
  backward per column: fewer, larger kernels. For large activations (convolutions) it loses:
  every backward op then streams ``K`` times the activation through memory instead of
  working in cache, some ops have slow broadcasting kernels (``threshold_backward`` of
  ReLU), and some have no batching rule at all and are looped inside the batched call
  anyway (``max_pool2d_with_indices_backward``: one kernel, zero-fill and a final copy
  per column).
- So the columns go in *chunks* of at most :data:`CHUNK_BYTES` bytes of the largest layer
  output per chunk (``chunk = CHUNK_BYTES // (bytes of one column there)``, at least 1, then
  evened out: 9 columns by at most 8 go as 5 + 4, not 8 + 1): a few chunks for an MLP (the
  MLP of ``benchmarks/bench_kfac.py``, 9 columns of 0.5 MiB, KFAC type-2, 1 thread, process
  time: 2 chunks 1-2 ms (4 %) faster than all 9 at once, whose ``[9, 256, 512]``
  intermediates are fresh memory each step; 3 a chunk no faster than 9, 1 a chunk 2 ms
  slower: the Grams of ``G`` over fewer rows lose more than that); one at a time once a column there takes
  :data:`LARGE_COLUMN_BYTES` (1 MiB) or more (a CNN: each backward then works in cache and the
  plain kernels beat the batched ones; small CNN of ``benchmarks/bench_kfac.py``, 9 columns of
  3 MiB, 1 thread: 14 ms one at a time, 19 ms in chunks of 2, 25 ms all at once). This also
  bounds the memory the backward's intermediates take (a chunk's, not all ``K`` columns'); the
  results are written into one preallocated ``[K, ...]`` tensor per layer (no final
  concatenation), or folded into column reductions chunk by chunk (:func:`column_chunks`).
- A model whose backward cannot be batched at all (``torch.compile``: ``aten::mm.out``
  has no batching rule) goes one column at a time (warned once, remembered per model).

Alternatives measured and not taken: ``torch.func.vmap`` over ``torch.autograd.grad``
(better batching rules, but slower than the legacy path on these models: extra copies),
and re-running the forward with the batch enlarged to ``K N`` (one backward, but ``K``
forwards: 3-4x slower on the CNNs).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine.state import ENGINE

#: bytes of the largest layer output per chunk of columns (module docstring; was 8 MiB, all
#: 9 columns of the bench MLP in one chunk)
CHUNK_BYTES = 4 * 2**20
#: columns this large at the largest layer output go one at a time (:func:`column_chunk`)
LARGE_COLUMN_BYTES = 2**20


def column_chunk(V: Tensor, shapes: Sequence[Sequence[int]]) -> int:
    """Columns per batched backward: ``CHUNK_BYTES`` over the bytes of one column of the
    largest of ``V``'s own column and the layer outputs ``shapes`` (at least 1); one column
    at a time once a column there takes :data:`LARGE_COLUMN_BYTES` or more.

    Large columns (convolution activations) gain nothing from the batched backward, whose
    convolution and max-pool backwards loop over the columns anyway, and lose to one backward
    per column in cache: on the CG-Newton example's CNN (9 columns of 1.5 MB at the first
    convolution) a whole CG-Newton step takes 28-32 ms CPU one column at a time, 33-35 ms
    with all 9 in one batch, 35-39 ms two at a time (``benchmarks/bench_cg_newton.py``)."""
    per_column = max([math.prod(V.shape[1:])] + [math.prod(s) for s in shapes]) * V.element_size()
    if per_column >= LARGE_COLUMN_BYTES:
        return 1
    return max(1, CHUNK_BYTES // max(per_column, 1))


def column_chunks(
    f: Tensor, edges: list, V: Tensor, roots: List[nn.Module], shapes: Sequence[Sequence[int]],
    chunk: Optional[int] = None,
) -> Iterator[Tuple[int, List[Optional[Tensor]]]]:
    """Back-propagate the ``K = V.shape[0]`` cotangents ``V`` ``[K, *f.shape]`` to ``edges``
    in chunks: yields ``(start, grads)`` per chunk, ``grads`` one ``[c, *shape]`` tensor per
    edge (``None`` where ``f`` does not depend on it) for the columns ``start .. start + c``.

    ``chunk``: columns per batched backward (default :func:`column_chunk`). A consumer that
    folds each chunk into its result and drops it (``curvature``'s column reductions) keeps
    only one chunk of columns alive. The graph is retained. Fallback: module docstring.
    """
    K = V.shape[0]
    batched = K > 1 and not any(r in ENGINE.no_batching for r in roots)
    if not batched:
        chunk = 1
    elif chunk is None:
        chunk = column_chunk(V, shapes)
        chunk = -(-K // -(-K // chunk))  # as many chunks, of equal sizes (9 by 4: 3, 3, 3)
    reached = [False] * len(edges)
    fell_back = False
    start = 0
    try:
        while start < K:
            Vc = V[start : start + chunk]
            if Vc.shape[0] > 1:
                grads = _try_batched(f, edges, Vc, roots)
                if grads is None:  # no batching rule: one column at a time from here on
                    chunk, fell_back = 1, True
                    continue
                grads = list(grads)
            else:
                grads = torch.autograd.grad(f, edges, Vc[0], retain_graph=True, allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            for i, g in enumerate(grads):
                reached[i] = reached[i] or g is not None
            yield start, grads
            grads = None  # the consumer may free the chunk before the next one
            start += Vc.shape[0]
    finally:
        if fell_back:  # fell back: remember the models it reached
            ENGINE.no_batching.update(r for r, hit in zip(roots, reached) if hit)


def backprop_columns(
    f: Tensor, edges: list, V: Tensor, roots: List[nn.Module], shapes: Sequence[Sequence[int]]
) -> tuple:
    """``torch.autograd.grad`` of ``f`` w.r.t. ``edges`` for the ``V.shape[0]`` cotangents
    ``V``: one ``[K, *shape]`` tensor per edge (``None`` where ``f`` does not depend on it).

    Args:
        f: the loss input (with its graph); ``V`` ``[K, *f.shape]``.
        edges: gradient edges of the layer outputs; ``shapes`` their shapes.
        roots: the extended model (or layer) of each edge, for the no-batching memory.

    The graph is retained. Chunks (:func:`column_chunks`) are written into one
    preallocated ``[K, ...]`` tensor per edge (no final concatenation).
    """
    K = V.shape[0]
    out: List[Optional[Tensor]] = [None] * len(edges)
    for start, grads in column_chunks(f, edges, V, roots, shapes):
        for i, g in enumerate(grads):
            if g is None:
                continue
            if out[i] is None:
                if g.shape[0] == K:  # everything in one chunk: no copy
                    out[i] = g
                    continue
                out[i] = g.new_empty((K,) + tuple(g.shape[1:]))
            out[i][start : start + g.shape[0]] = g
    return tuple(out)


def _try_batched(f: Tensor, edges: list, Vc: Tensor, roots: List[nn.Module]) -> Optional[tuple]:
    """One batched backward (``is_grads_batched``); ``None`` (warned once) where an
    operation of the backward has no batching rule (a ``torch.compile``d model: its
    compiled backward calls ``aten::mm.out``)."""
    try:
        return torch.autograd.grad(
            f, edges, grad_outputs=Vc, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError as e:
        if "atching rule" not in str(e) and "vmap" not in str(e):
            raise
        warnings.warn(
            "curvlib: the backward graph of this model cannot be batched over the "
            f"curvature cotangents (torch: {str(e).splitlines()[0]}); back-propagating them "
            "one at a time instead (same result, slower). This happens for torch.compile'd "
            "models with fisher_type 'type-2' or mc_samples > 1.",
            stacklevel=3,
        )
        return None


__all__ = ["backprop_columns", "column_chunks", "column_chunk", "CHUNK_BYTES", "LARGE_COLUMN_BYTES"]
