"""What the forward pass leaves for the backward: one record per layer call."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

_ids = itertools.count()


@dataclass(eq=False)
class LayerCall:
    """One forward call of an extended layer.

    Attributes:
        module: the layer.
        root: the extended model whose forward produced this call (it owns the call).
        input: the layer input (detached reference; autograd keeps it anyway).
        output_edge: gradient edge of the layer output, taken *before* any in-place
            operation on it, so that cotangents refer to the layer's own output.
        output_shape: shape of the layer output.
        extra: cotangents w.r.t. the output from the engine's batched extra backward,
            one ``[K, *output_shape]`` tensor per curvature source key.
        root_inputs: ``(args, kwargs)`` of the root's forward call (tensors detached),
            for extensions that re-run the model (HMP); dropped with the call.
        reduced: column reductions (``Extension.column_reduction``) summed over the chunks of
            columns back-propagated to this call: ``(id(extension), source) -> {name: tensor}``.
    """

    module: nn.Module
    root: Optional[nn.Module]
    input: Optional[Tensor]
    output_edge: object
    output_shape: torch.Size
    extra: Dict[object, Tensor] = field(default_factory=dict)
    reduced: Dict[object, Dict[str, Tensor]] = field(default_factory=dict)
    #: the sources of ``extra`` that the engine left matrix-free (``lazy_columns.LazyColumns``)
    lazy: Optional[Any] = None
    #: the model ran another forward before this call was back-propagated: the call is
    #: then owned by its own autograd graph (``hooks._demote_all``), not by the model, and
    #: ``output_edge`` is found again from the loss (``loss_columns.demoted_edges``)
    demoted: bool = False
    uid: int = field(default_factory=lambda: next(_ids))
    root_inputs: Optional[Tuple[tuple, Dict[str, Any]]] = None
    #: recorded while a backward pass was running (a forward recomputed inside backward,
    #: e.g. by reentrant activation checkpointing)
    in_backward: bool = False
    #: the handle of the tensor hook on the output (removed when the call is re-recorded on an
    #: output expanded to the batch, :mod:`curvlib.engine.operations`)
    hook: Optional[Any] = None
    #: raised when a curvature backward reaches the call: the forward found its per-sample
    #: quantities undefined (a batch-1 output broadcast over the batch and not handled)
    error: Optional[str] = None

    @property
    def live(self) -> bool:
        """Recorded and not yet back-propagated (nor dropped)."""
        return self.input is not None and (self.output_edge is not None or self.demoted)

    def release(self) -> None:
        """Drop the tensors this call holds."""
        self.input = None
        self.output_edge = None
        self.demoted = False
        self.extra = {}
        self.reduced = {}
        self.lazy = None
        self.root_inputs = None
        self.hook = None


class CallList(list):
    """The layer calls an extended model owns (its attribute ``_curvlib_calls``).

    They refer to the autograd graph of one forward (gradient edges, which cannot be
    pickled) and are meaningless for another object: copies (``copy.deepcopy``, pickle,
    ``torch.save``) of the owner get an empty list. The copy's hooks are copied with it,
    so it stays extended and records its own calls on its next forward.

    Attributes:
        root_batch: the batch size of the forward (dimension 0 of the model's first batched tensor
            argument; ``None`` if it has none); ``max_batch``: the largest batch of its calls;
        batch1: its calls on a batch of 1 (checked at the end of the forward, ``hooks``).
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.root_batch: Optional[int] = None
        self.max_batch = 0
        self.batch1: list = []

    def __reduce_ex__(self, protocol):
        return (CallList, ())

    def __deepcopy__(self, memo):
        return CallList()


@dataclass(eq=False)
class LossCall:
    """One extended loss reached by a backward inside a ``curvature`` context.

    Attributes:
        module: the loss module; ``f`` its (detached) input, ``y`` its target.
        weight: ``d objective / d loss`` (1 for ``loss.backward()``).
    """

    module: nn.Module
    f: Tensor
    y: Optional[Tensor]
    weight: float


@dataclass(eq=False)
class Objective:
    """What one backward differentiated, as a record for extensions that re-evaluate it (HMP):
    ``weight * loss.module(root(*args, **kwargs), loss.y)``.

    Attributes:
        root: the extended model whose output fed the loss.
        inputs: ``(args, kwargs)`` of that forward call (tensors detached).
        loss: the extended loss reached by the backward (module, input, target, weight).
    """

    root: nn.Module
    inputs: Tuple[tuple, Dict[str, Any]]
    loss: LossCall
