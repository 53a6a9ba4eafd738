r"""``SubBatch``: run extensions on a random fraction of the batch, inside the same backward.

The curvature of a sub-batch ``S`` of ``n`` of the ``N`` samples (the KPSVD-paper code's Fisher
sub-batch): every layer's capture is restricted to the samples in ``S`` (layer inputs ``x[S]``,
cotangents ``raw[:, S]``) and the cotangents are multiplied by ``sqrt(N / n)``, so that a
mean-normalized quantity (``G = sum s s^T`` with ``1/N`` inside ``s s^T``) becomes the mean over
the sub-batch, ``(1/n) sum_{i in S}``, the same normalization as on the whole batch; ``A = 1/(n T)
sum a a^T`` is normalized by the sub-batch's own size. With ``fraction=1`` the results are those
of the wrapped extensions. The sub-batch is drawn once per backward (the same samples for every
layer) with ``generator``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Set, Tuple

import torch

from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.extension import Extension


class SubBatch(Extension):
    """Wrap an extension so that it sees a random ``fraction`` of the batch.

    Args:
        ext: the extension (its ``savefield``, results and methods are passed through).
        fraction: in ``(0, 1]``; the sub-batch has ``max(1, round(fraction N))`` samples.
        generator: draws the sub-batch (``None``: the global RNG). Wrappers that share one
            :class:`SubBatchSampler` (``sampler=``) see the same samples.
    """

    def __init__(self, ext: Any, fraction: float, generator: Optional[torch.Generator] = None,
                 sampler: Optional["SubBatchSampler"] = None):
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"curvlib: SubBatch(fraction={fraction!r}) must be in (0, 1].")
        self.inner = ext
        self.sampler = sampler or SubBatchSampler(float(fraction), generator)

    @property
    def savefield(self) -> str:
        return self.inner.savefield

    @property
    def check_finite(self) -> bool:
        return self.inner.check_finite

    @property
    def coupled_samples(self) -> str:
        return self.inner.coupled_samples

    @property
    def accumulation(self) -> Optional[str]:
        return self.inner.accumulation

    def count(self, capture: LayerCapture) -> int:
        return self.inner.count(capture)

    def accumulate(self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]) -> Any:
        return self.inner.accumulate(capture, name, old, new, counts)

    def sources(self) -> Set[Source]:
        return self.inner.sources()

    def begin(self) -> None:
        self.sampler.reset()
        self.inner.begin()

    def finish(self) -> None:
        self.inner.finish()

    def selects(self, param: Any) -> bool:
        return self.inner.selects(param)

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        return self.inner.compute(self.sampler.restrict(capture))

    def __getattr__(self, name: str) -> Any:  # operator(), warm starts, ...
        return getattr(self.__dict__["inner"], name)

    def __repr__(self) -> str:
        return f"SubBatch({self.inner!r}, fraction={self.sampler.fraction})"


class SubBatchSampler:
    """Draws one sub-batch per backward and restricts captures to it."""

    def __init__(self, fraction: float, generator: Optional[torch.Generator] = None):
        self.fraction, self.generator = fraction, generator
        self.index: Optional[torch.Tensor] = None
        self._cache: Dict[int, Any] = {}

    def reset(self) -> None:
        self.index, self._cache = None, {}

    def restrict(self, capture: LayerCapture) -> LayerCapture:
        key = id(capture)
        if key in self._cache:
            return self._cache[key][1]
        N = capture.batch_size
        if self.index is None or int(self.index.max()) >= N:
            n = max(1, round(self.fraction * N))
            self.index = torch.randperm(N, generator=self.generator)[:n].sort().values
        idx = self.index.to(capture.calls[0].x.device)
        n = idx.numel()
        out = capture if n == N else capture.select(idx, math.sqrt(N / n))
        self._cache = {key: (capture, out)}  # one layer at a time: keep only the current capture
        return out


__all__ = ["SubBatch", "SubBatchSampler"]
