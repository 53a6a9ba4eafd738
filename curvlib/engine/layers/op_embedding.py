"""Rule: a parameter as the table of ``F.embedding``.

The call is recorded as an :class:`EmbeddingPart` with the attributes of the ``nn.Embedding`` that
would make it (``num_embeddings``, ``padding_idx``, ``scale_grad_by_freq``), on per-sample views of
the indices and the output: :mod:`~curvlib.engine.layers.embedding` describes it unchanged
(``p.kfac = [A, G]``, ``A`` the 1-D token frequencies; ``scale_grad_by_freq`` refused).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from curvlib.engine.layers.batch_layout import per_sample, restore
from curvlib.engine.layers.embedding import EmbeddingAdapter
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, OpRule, part_name
from curvlib.engine.layers.parts import Part


class EmbeddingPart(Part):
    """The table ``[V, D]`` of a functional embedding lookup."""

    def __init__(self, owner, name, weight, padding_idx, scale_grad_by_freq, label=None):
        super().__init__(owner, name, weight, None, label)
        self.num_embeddings = weight.shape[0]
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings  # as F.embedding
        self.padding_idx, self.scale_grad_by_freq = padding_idx, bool(scale_grad_by_freq)


class EmbeddingPartAdapter(EmbeddingAdapter):
    module_types = (EmbeddingPart,)


class EmbeddingRule(OpRule):
    funcs = (F.embedding,)

    def capture(self, call: OpCall) -> Any:
        ids, w = call.arg(0, "input"), call.arg(1, "weight")
        wu = call.param(w)
        if wu is None or wu.kind != "same":
            return NOT_COVERED
        part = EmbeddingPart(wu.owner, part_name(call.op, [wu]), wu.param, call.arg(2, "padding_idx"),
                             call.arg(5, "scale_grad_by_freq", False), label=call.label([wu]))
        EmbeddingPartAdapter().check(part)
        y = call.func(*call.args, **call.kwargs)
        if ids.ndim == 0:
            call.record(part, ids, y)
            return y
        L = call.layout(ids)
        if not L.known:
            call.unknown_batch([wu], "indices", L)
        yc = per_sample(y, L)
        call.record(part, per_sample(ids, L), yc)
        return restore(yc, L)


__all__ = ["EmbeddingPart", "EmbeddingPartAdapter", "EmbeddingRule"]
