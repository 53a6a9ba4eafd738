"""The ``curvature`` context: runs extensions during ``loss.backward()``."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import torch
from torch import Tensor, nn

from curvlib.engine import state
from curvlib.engine.capture import LayerCapture, Source, finite_or_raise
from curvlib.engine.layers import adapter_for
from curvlib.engine.losses import loss_adapter_for
from curvlib.engine.records import LayerCall, LossCall


class curvature:
    """Compute curvature extensions during the ``backward`` calls inside the block.

    Example::

        loss = loss_fn(model(x), y)
        with curvature(KFAC(fisher_type="type-2"), BatchGrad()):
            loss.backward()        # p.grad as usual, plus p.kfac, p.grad_batch

    When an extension needs ``"mc"`` or ``"type-2"`` cotangents, the engine generates
    them at the (extended) loss and back-propagates all of them at once, batched with
    ``torch.autograd.grad(..., is_grads_batched=True)``, from the model output to every
    extended layer output, inside the same ``backward`` call; parameter gradients are
    not computed for them.

    ``generator``: the ``torch.Generator`` that draws the ``"mc"`` targets (``None``: the
    global RNG); an optimizer passes its own so that a checkpoint can restore the draws.
    """

    def __init__(self, *extensions, generator: Optional[torch.Generator] = None):
        for ext in extensions:  # duck-typed: the engine does not import the extensions
            if isinstance(ext, type) or not all(
                hasattr(ext, a) for a in ("savefield", "check_finite", "sources", "compute", "begin", "finish")
            ):
                raise TypeError(
                    f"curvlib.curvature expects extension instances (e.g. KFAC()), got {ext!r}."
                )
        savefields = [e.savefield for e in extensions]
        if len(set(savefields)) != len(savefields):
            raise ValueError(
                f"curvlib: two extensions write the same savefield ({savefields}); "
                "use one curvature context per configuration."
            )
        self.extensions = list(extensions)
        self.generator = generator
        self.sources: Set[Source] = set().union(*(e.sources() for e in extensions))
        self.num_captures = 0
        self.empirical_scale: Optional[float] = None
        #: extended losses reached by backwards in this context (for extensions that
        #: re-evaluate the objective, e.g. HMP); cleared on exit
        self.loss_calls: List[LossCall] = []

    # ----------------------------------------------------------------- context
    def __enter__(self) -> "curvature":
        if state.ACTIVE is not None:
            raise RuntimeError("curvlib: curvature contexts cannot be nested.")
        state.ACTIVE = self
        self.num_captures = 0
        self.empirical_scale = None
        self.loss_calls = []
        for ext in self.extensions:
            ext.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        state.ACTIVE = None
        for call in state.TAPE.values():
            call.extra = {}
        self.loss_calls = []
        if exc_type is not None:
            return
        if self.num_captures == 0:
            raise RuntimeError(
                "curvlib: no extended layer took part in a backward inside this curvature "
                "context. Call `model = curvlib.extend(model)` before the forward pass and "
                "run `loss.backward()` inside the `with curvature(...)` block."
            )
        for ext in self.extensions:
            ext.finish()

    # ------------------------------------------------------------------- loss
    def _process_loss(self, loss: nn.Module, f: Tensor, y: Optional[Tensor], w: Tensor) -> None:
        adapter = loss_adapter_for(loss)
        adapter.check(loss)
        f_graph, f = f, f.detach()
        weight = float(w.reshape(-1)[0]) if w.numel() == 1 else None
        if weight is None or weight < 0:
            raise ValueError(
                f"curvlib: the loss {loss} must be reduced to a scalar that enters the "
                "objective with a non-negative weight for curvature (GGN) to be defined."
            )
        self.loss_calls.append(LossCall(loss, f, y, weight))
        with torch.no_grad():
            self.empirical_scale = math.sqrt(adapter.normalization(loss, f, y))
            cots: List[Tensor] = []
            keys: List[Source] = []
            for src in sorted(self.sources, key=str):
                if src in ("grad", "empirical"):
                    continue
                if isinstance(src, tuple) and src[0] == "mc":
                    S = adapter.mc_cotangents(loss, f, y, src[1], self.generator)
                else:
                    S = adapter.type2_cotangents(loss, f, y, exact=src == "type-2-exact")
                if weight != 1.0:
                    S = S * math.sqrt(weight)
                cots.append(S)
                keys.append(src)
        if not cots:
            return
        finite_or_raise(cots, loss, "the loss curvature (model output)")
        calls = [c for c in state.TAPE.values() if c.output_edge is not None]
        if not calls:
            return
        sizes = [S.shape[0] for S in cots]
        state.IN_EXTRA_BACKWARD = True
        try:
            V = torch.cat(cots)
            edges = [c.output_edge for c in calls]
            if V.shape[0] == 1:  # a single cotangent needs no batching
                grads = torch.autograd.grad(
                    f_graph, edges, V[0], retain_graph=True, allow_unused=True
                )
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = torch.autograd.grad(
                    f_graph,
                    edges,
                    grad_outputs=V,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        finally:
            state.IN_EXTRA_BACKWARD = False
        for call, g in zip(calls, grads):
            if g is None:
                continue
            for key, part in zip(keys, g.split(sizes)):
                old = call.extra.get(key)
                call.extra[key] = part if old is None else torch.cat([old, part])

    # ------------------------------------------------------------------ layer
    def _process_layer(self, call: LayerCall, grad: Tensor) -> None:
        module = call.module
        if call.repeated:
            raise NotImplementedError(
                f"curvlib: {module} was called more than once in one forward pass of the "
                "extended model; weight tying across calls is not supported yet."
            )
        if self.empirical_scale is None:
            # loss not extended: assume the mean over the batch dimension
            self.empirical_scale = math.sqrt(adapter_for(module).batch_size(module, call.input))
        raw: Dict[Source, Tensor] = dict(call.extra)
        raw["grad"] = grad.detach().unsqueeze(0)
        capture = LayerCapture(
            module,
            adapter_for(module),
            call.input,
            raw,
            self.empirical_scale,
            root=call.root,
            root_inputs=call.root_inputs,
            loss_calls=list(self.loss_calls),
            order=call.uid,
        )
        with torch.no_grad():
            for ext in self.extensions:
                for name, value in ext.compute(capture).items():
                    if ext.check_finite:
                        finite_or_raise(value, module, f"{ext.savefield} of the {name}")
                    setattr(getattr(module, name), ext.savefield, value)
        state.TAPE.pop(call.uid, None)
        call.release()
        self.num_captures += 1


__all__ = ["curvature"]
