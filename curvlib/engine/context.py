"""The ``curvature`` context: its lifecycle, and running the extensions during ``loss.backward()``.

What it delegates: the loss's cotangent columns to :mod:`curvlib.engine.loss_columns`, coupled-sample
detection to :mod:`curvlib.engine.coupling`, the recording of layer calls to :mod:`curvlib.engine.hooks`
(which calls :meth:`curvature.process_layer` and :meth:`curvature.process_loss`), and the engine's
shared state to :data:`curvlib.engine.state.ENGINE`.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine.capture import LayerCapture, SharedCapture, Source, finite_or_raise
from curvlib.engine.coupling import CouplingCheck
from curvlib.engine.extension import Extension
from curvlib.engine.layers import adapter_for
from curvlib.engine.loss_columns import LossColumns, empirical_scale, other_live_calls
from curvlib.engine.losses import loss_adapter_for
from curvlib.engine.hooks import calls_key
from curvlib.engine.records import LayerCall, LossCall
from curvlib.engine.state import ENGINE
from curvlib.engine.tying import TieGroup, split_group


class curvature:
    """Compute curvature extensions during the ``backward`` calls inside the block.

    Args:
        *extensions: extension instances from :mod:`curvlib.extensions` (``KFAC()``,
            ``GGNMP()``, ...), at most one per savefield.

    ``with curvature(...) as ctx`` gives the context; ``ctx.extensions`` is the list passed in
    (for results kept on an extension: ``GGNMP.operator()``, ``KFAC(cross_layer=True).cross``).

    What happens: the forward may run before the block (as below); the ``backward`` must run
    inside it. The backward computes ``p.grad`` exactly as without curvlib, and each extended
    layer it reaches gets ``p.<savefield>`` for each of its parameters that require gradients
    (``p.kfac``, ``p.grad_batch``, ...: see each extension's docstring for shapes and scaling).
    When an extension needs ``"mc"`` or ``"type-2"`` cotangents, the engine generates them at the
    (extended) loss and back-propagates them, in batched chunks
    (:mod:`curvlib.engine.columns`), from the model output to every extended layer output,
    inside the same ``backward`` call; parameter gradients are not computed for them.
    Extensions that share a ``fisher_type`` share the columns (one back-propagation).

    Requirements (each violation raises an error that says what to do):

    - the model was passed to :func:`curvlib.extend` before the forward; if no extended layer
      took part in a backward inside the block, leaving the block raises ``RuntimeError``;
    - ``fisher_type="mc"`` / ``"type-2"`` (and ``HMP``) need an extended loss
      (``extend(torch.nn.CrossEntropyLoss())``, ``NLLLoss``, ``MSELoss``, ``BCEWithLogitsLoss``;
      reduction ``"mean"`` or ``"sum"``) fed directly by the model output;
    - one backward through each forward of the extended model; several forwards before one
      backward are fine, and a layer called several times before one backward (shared
      weights, an unrolled loop, a GAN's discriminator on real and fake data) gets the
      quantities of all its calls summed as positions (:class:`~curvlib.engine.capture.SharedCapture`);
    - contexts cannot be nested.

    Several ``backward`` calls in one context (gradient accumulation over micro-batches)
    accumulate every quantity like ``p.grad``: with the micro-batch losses scaled as for
    gradient accumulation (``loss_fn(model(x_i), y_i) * len(x_i) / N`` with
    ``reduction="mean"``, unscaled with ``"sum"``) the result equals one backward on the
    concatenated batch (``Extension.accumulate``); an extension that cannot accumulate
    raises at the second backward.

    Empirical Fisher: a sample's loss ``l_n`` enters the objective with the weight
    ``kappa = w / N'`` (``w = d objective / d loss``, ``N'`` the loss's mean normalization,
    1 for ``"sum"``); the empirical Fisher of that objective is
    ``kappa sum_n grad l_n grad l_n^T``. It is linear in the objective like the GGN, so it
    adds up over micro-batches; several extended losses in one backward must give the same
    ``kappa`` (e.g. two means over the same number of terms), otherwise an error is raised.

    On exit, the savefields of the context's extensions are removed from every parameter
    of the extended models that took part in it but got no value in it (frozen or unused
    parameters keep no stale result; other models keep theirs). Samples coupled by the forward (BatchNorm in training mode, see
    :mod:`curvlib.engine.coupling`) make exact and per-sample quantities raise and KFAC
    warn. An extended layer of a model that took part in a backward but received no call
    (e.g. its output does not reach the loss, or it is used through its parameters only) is
    warned about once.

    ``generator``: the ``torch.Generator`` that draws the ``"mc"`` targets (``None``: the
    global RNG); an optimizer passes its own so that a checkpoint can restore the draws.

    ``check_finite``: raise ``FloatingPointError`` at the first NaN / Inf in a captured quantity
    (default). ``False`` stores non-finite values as they are, for a caller that checks them
    itself (a data-parallel optimizer must fail on every process in the same step, not inside
    one process's backward).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import KFAC, BatchGrad
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> loss = loss_fn(model(x), y)
        >>> with curvature(KFAC(fisher_type="type-2"), BatchGrad()) as ctx:
        ...     loss.backward()        # p.grad as usual, plus p.kfac, p.grad_batch
        >>> W = model[0].weight
        >>> W.grad.shape, [F.shape for F in W.kfac], W.grad_batch.shape
        (torch.Size([3, 4]), [torch.Size([3, 3]), torch.Size([4, 4])], torch.Size([8, 3, 4]))
        >>> [type(e).__name__ for e in ctx.extensions]
        ['KFAC', 'BatchGrad']
    """

    def __init__(self, *extensions, generator: Optional[torch.Generator] = None, check_finite: bool = True):
        for ext in extensions:  # the engine's contract; it does not import the extensions
            if not isinstance(ext, Extension):
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
        self.check_finite = bool(check_finite)
        self.sources: Set[Source] = set().union(*(e.sources() for e in extensions))
        #: coupled-sample detection (:mod:`curvlib.engine.coupling`)
        self.coupling = CouplingCheck(self.extensions)
        #: the loss's cotangent columns and how they reach the layer calls
        self.columns = LossColumns(self.extensions, self.sources, self.check_finite, self.coupling)
        self.num_captures = 0
        self.empirical_scale: Optional[float] = None
        #: extended losses reached by the current backward (for extensions that
        #: re-evaluate the objective, e.g. HMP); cleared on exit
        self.loss_calls: List[LossCall] = []
        self._reset()

    def _reset(self) -> None:
        #: number of backwards that reached this context so far
        self.num_backwards = 0
        self._in_backward = False
        #: (extension index, id(param)) -> (param, backward index, count) of values written
        self._written: Dict[Tuple[int, int], Tuple[nn.Parameter, int, int]] = {}
        #: per backward: sample weights kappa of the extended losses, processed modules,
        #: models that took part
        self._kappas: List[Tuple[nn.Module, float]] = []
        self._processed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._roots: Dict[int, nn.Module] = {}
        self._all_roots: Dict[int, nn.Module] = {}
        self.coupling.reset()
        #: per backward: captures of layers with further live calls, waiting for them, by
        #: ``hooks.calls_key`` (a layer, or the group of layers that share a parameter)
        self._pending: Dict[object, List[LayerCapture]] = {}

    # ----------------------------------------------------------------- context
    def __enter__(self) -> "curvature":
        if ENGINE.active is not None:
            raise RuntimeError("curvlib: curvature contexts cannot be nested.")
        ENGINE.active = self
        self.num_captures = 0
        self.empirical_scale = None
        self.loss_calls = []
        self._reset()
        for ext in self.extensions:
            ext.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        ENGINE.active = None
        for call in ENGINE.tape.values():
            call.extra = {}
            call.reduced = {}
        self.loss_calls = []
        self._in_backward = False
        if exc_type is not None:
            return
        self._clear_stale()
        if self.num_captures == 0:
            raise RuntimeError(
                "curvlib: no extended layer took part in a backward inside this curvature "
                "context. Call `model = curvlib.extend(model)` before the forward pass and "
                "run `loss.backward()` inside the `with curvature(...)` block."
            )
        for ext in self.extensions:
            ext.finish()

    def counts(self, ext: Any) -> Dict[int, int]:
        """Rows behind each value ``ext`` wrote in this context (``ext.count`` summed over the
        backwards), by ``id(param)``: the weights that combine row means across batches
        (e.g. the ``A`` factors of several processes)."""
        i = next(j for j, e in enumerate(self.extensions) if e is ext)
        return {pid: c for (j, pid), (_, _, c) in self._written.items() if j == i}

    # -------------------------------------------------------------- backwards
    def _begin_backward(self) -> None:
        """At the first hook of a backward: per-backward state, end-of-backward callback."""
        if self._in_backward:
            return
        if self.num_backwards >= 1:
            stuck = [e for e in self.extensions if e.accumulation is None]
            if stuck:
                raise RuntimeError(
                    f"curvlib: {', '.join(type(e).__name__ for e in stuck)} cannot accumulate "
                    "over several backward calls in one curvature context (gradient "
                    "accumulation); its value would describe the last micro-batch only. Run "
                    "one backward per `with curvature(...)` block, or one backward on the "
                    "whole batch."
                )
        self._in_backward = True
        self.num_backwards += 1
        self.empirical_scale = None
        self.loss_calls = []
        self._kappas = []
        self._processed = weakref.WeakSet()
        self._roots = {}
        self.coupling.new_backward()
        self._pending = {}
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        """After the backward: process the layers whose calls were not all reached (a call
        of a forward this backward does not reach); warn about adapted layers of the models
        that took part but received no call (unused, or applied functionally through its
        parameters)."""
        while self._pending:
            self._run_group(next(iter(self._pending)))
        self._in_backward = False
        for root in self._roots.values():
            for name, sub in root.named_modules():
                if sub in self._processed or sub in ENGINE.warned_uncalled or adapter_for(sub) is None:
                    continue
                if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                    continue
                ENGINE.warned_uncalled.add(sub)
                warnings.warn(
                    f"curvlib: the extended layer '{name}' ({type(sub).__name__}) of "
                    f"{type(root).__name__} took part in no call during a curvature backward "
                    "of its model, so its parameters get no curvature. A layer used through "
                    "its parameters only (e.g. a weight passed to a functional call) is invisible "
                    "to the hooks; a layer whose output does not reach the loss gets nothing "
                    "either.",
                    stacklevel=2,
                )

    def _clear_stale(self) -> None:
        """Remove the owned savefields from parameters of the extended models that took part
        in this context but got no value in it (frozen, unused, or from an earlier capture).
        Other models keep theirs: two models (a GAN's generator and discriminator, teacher
        and student) can be captured in separate contexts and used together."""
        roots = list(self._all_roots.values())
        for i, ext in enumerate(self.extensions):
            field = ext.savefield
            if not field:
                continue
            for root in roots:
                for p in root.parameters():
                    if (i, id(p)) not in self._written and field in p.__dict__:
                        delattr(p, field)

    # ------------------------------------------------------------------- loss
    def process_loss(self, loss: nn.Module, f: Tensor, y: Optional[Tensor], w: Tensor) -> None:
        """The backward reached the extended ``loss`` (input ``f``, target ``y``, ``w = d
        objective / d loss``): back-propagate the curvature cotangents to the pending layer calls
        (:class:`~curvlib.engine.loss_columns.LossColumns`)."""
        adapter = loss_adapter_for(loss)
        adapter.check(loss)
        if f.numel() == 0:
            raise ValueError(
                f"curvlib: the loss {loss} got an empty input (shape {tuple(f.shape)}); "
                "curvature of an empty batch is undefined. Skip empty batches."
            )
        f_graph, f = f, f.detach()
        weight = float(w.reshape(-1)[0]) if w.numel() == 1 else None
        if weight is None or weight < 0:
            raise ValueError(
                f"curvlib: the loss {loss} must be reduced to a scalar that enters the "
                "objective with a non-negative weight for curvature (GGN) to be defined."
            )
        self._begin_backward()
        self.loss_calls.append(LossCall(loss, f, y, weight))
        with torch.no_grad():
            kappa = weight / adapter.normalization(loss, f, y)
            self.empirical_scale = empirical_scale(self._kappas, loss, kappa, "empirical" in self.sources)
            cols = self.columns.build(adapter, loss, f, y, weight, self.generator)
        if self.check_finite:
            finite_or_raise(cols.blocks, loss, "the loss curvature (model output)")
        self.columns.deliver(f_graph, cols, self._pending, self.empirical_scale)

    # ------------------------------------------------------------------ layer
    def process_layer(self, call: LayerCall, grad: Tensor) -> None:
        """The backward reached ``call``'s output: capture it, and run the extensions on the
        layer once all of its live calls are captured (several calls of one layer before
        one backward are combined as positions, :class:`SharedCapture`; a call this backward
        does not reach is waited for until the end of the backward)."""
        module = call.module
        self._begin_backward()
        if call.root is not None:
            self._roots[id(call.root)] = self._all_roots[id(call.root)] = call.root
        self.coupling.check(call.root, call)
        if self.empirical_scale is None:
            if self.num_backwards > 1 and "empirical" in self.sources:
                raise RuntimeError(
                    "curvlib: fisher_type='empirical' over several backward calls in one "
                    "curvature context needs the extended loss (its reduction and the "
                    "micro-batch scaling define the empirical Fisher): loss_fn = "
                    "curvlib.extend(torch.nn.CrossEntropyLoss()) (or MSELoss, ...)."
                )
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
            backward=self.num_backwards - 1,
            reduced=call.reduced,
            lazy=call.lazy,
        )
        ENGINE.tape.pop(call.uid, None)
        call.release()
        key = calls_key(module)
        self._pending.setdefault(key, []).append(capture)
        if other_live_calls(call):
            return  # another call of this layer (or of a layer sharing a parameter) is to come
        self._run_group(key)

    def _run_group(self, key: object) -> None:
        """Run the extensions on the captured calls under ``key`` (:func:`~curvlib.engine.hooks.calls_key`)
        in this backward: one layer's calls as one capture; a :class:`~curvlib.engine.tying.TieGroup`'s
        as its layers' untied parameters and one capture per tied parameter
        (:func:`~curvlib.engine.tying.split_group`)."""
        captures = self._pending.pop(key)
        if isinstance(key, TieGroup):
            units = split_group(captures)
        else:
            units = [captures[0] if len(captures) == 1 else SharedCapture(captures)]
        with torch.no_grad():
            for capture in units:
                for i, ext in enumerate(self.extensions):
                    part = selected(ext, capture)
                    if part is not None:
                        self._run_extension(i, ext, part)
        for c in captures:  # a part of a composite layer (attention's projections) counts for its owner
            self._processed.add(c.module if isinstance(c.module, nn.Module) else c.module.owner)
        self.num_captures += 1

    def _run_extension(self, i: int, ext: Extension, capture: LayerCapture) -> None:
        """``ext.compute`` and store, accumulating over the backwards of this context."""
        b = capture.backward
        earlier: Dict[str, Any] = {}
        for name, p in capture.params.items():
            prev = self._written.get((i, id(p)))
            if prev is None:
                continue
            if prev[1] == b:  # the calls of a parameter's layers are joined (engine.tying)
                raise RuntimeError(
                    f"curvlib: {ext.savefield} of the {name} of {capture.module} was computed "
                    "twice in one backward: the engine did not join all layers that use this "
                    "parameter (weight tying established during the backward?). Please report "
                    "this with the model."
                )
            # taken off the parameter so that compute() does not reuse it as a buffer
            earlier[name] = p.__dict__.pop(ext.savefield, None)
        values = ext.compute(capture)
        n = ext.count(capture)
        for name, value in values.items():
            if ext.check_finite and self.check_finite:
                finite_or_raise(value, capture.module, f"{ext.savefield} of the {name}")
            p = capture.params[name]
            count = n
            if earlier.get(name) is not None:
                n_old = self._written[(i, id(p))][2]
                value = ext.accumulate(capture, name, earlier[name], value, (n_old, n))
                count = n_old + n
            setattr(p, ext.savefield, value)
            self._written[(i, id(p))] = (p, b, count)


def selected(ext: Extension, capture: LayerCapture) -> Optional[LayerCapture]:
    """``capture`` restricted to the parameters ``ext`` selects (:meth:`Extension.selects`):
    ``capture`` itself when it selects all, ``None`` when it selects none."""
    names = [n for n, p in capture.params.items() if ext.selects(p)]
    if not names:
        return None
    return capture if len(names) == len(capture.params) else capture.restricted(names)


__all__ = ["curvature", "selected"]
