"""The ``curvature`` context: runs extensions during ``loss.backward()``."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import coupling, hooks, lazy_columns, state
from curvlib.engine.capture import LayerCapture, SharedCapture, Source, finite_or_raise
from curvlib.engine.extension import Extension
from curvlib.engine.columns import backprop_columns, column_chunk, column_chunks
from curvlib.engine.layers import adapter_for
from curvlib.engine.losses import loss_adapter_for
from curvlib.engine.records import LayerCall, LossCall


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
        #: sources every reader of which sums its columns (``Extension.column_reduction``):
        #: back-propagated in chunks, reduced and freed (never stored on the captures)
        self._reducers: Dict[Source, List[Tuple[int, Any]]] = {}
        for src in self.sources - {"grad", "empirical"}:
            readers = [e for e in extensions if src in e.sources()]
            fns = [e.column_reduction(src) for e in readers]
            if readers and all(fn is not None for fn in fns):
                self._reducers[src] = [(id(e), fn) for e, fn in zip(readers, fns)]
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
        #: models that took part, their coupling modules
        self._kappas: List[Tuple[nn.Module, float]] = []
        self._processed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._roots: Dict[int, nn.Module] = {}
        self._coupling: Dict[int, list] = {}
        self._all_roots: Dict[int, nn.Module] = {}
        #: uids of layer calls whose coupling probe leaked
        self._leaks: Set[int] = set()
        #: per backward: captures of layers with further live calls, waiting for them
        self._pending: Dict[nn.Module, List[LayerCapture]] = {}

    # ----------------------------------------------------------------- context
    def __enter__(self) -> "curvature":
        if state.ACTIVE is not None:
            raise RuntimeError("curvlib: curvature contexts cannot be nested.")
        state.ACTIVE = self
        self.num_captures = 0
        self.empirical_scale = None
        self.loss_calls = []
        self._reset()
        for ext in self.extensions:
            ext.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        state.ACTIVE = None
        for call in state.TAPE.values():
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
        self._coupling = {}
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
                if sub in self._processed or sub in _WARNED_UNCALLED or adapter_for(sub) is None:
                    continue
                if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                    continue
                _WARNED_UNCALLED.add(sub)
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

    def _coupling_probe(self, calls: List[LayerCall], f: Tensor) -> Optional[Tensor]:
        """On the first capture of a model (per training mode): one extra output cotangent,
        nonzero on sample 0 only, back-propagated with the others; a layer whose cotangent
        is nonzero on another sample has a coupling module downstream (generic detection of
        what :mod:`curvlib.engine.coupling` does not know)."""
        if f.ndim == 0 or f.shape[0] < 2:
            return None
        if not any(_same_batch(c, f) for c in calls):
            return None
        if all(e.coupled_samples == "exact" for e in self.extensions):
            return None
        new = False
        for root in {id(c.root): c.root for c in calls if c.root is not None}.values():
            modes = _PROBED.setdefault(root, set())
            if root.training not in modes:
                modes.add(root.training)
                new = True
        if not new:
            return None
        gen = torch.Generator().manual_seed(0)  # leaves the global random stream alone
        v = torch.zeros((1,) + tuple(f.shape), dtype=f.dtype)
        v[0, 0] = torch.rand(f.shape[1:], generator=gen, dtype=f.dtype) + 0.5
        return v.to(f.device)

    def _check_coupling(self, root: Optional[nn.Module], call: Optional[LayerCall] = None) -> None:
        """Raise or warn (per extension) if ``root`` couples the samples of the batch (a known
        coupling module, or the probe leaked at ``call``'s layer)."""
        if call is not None and call.uid in self._leaks and root is not None:
            name = next((n for n, m in root.named_modules() if m is call.module), type(call.module).__name__)
            self._on_coupling(
                root,
                f"a module downstream of the layer '{name}' ({type(call.module).__name__}) of the "
                f"extended model {type(root).__name__} (the output cotangent of one sample "
                "reached the other samples there)",
            )
        if root is None or id(root) in self._coupling:
            return
        found = self._coupling[id(root)] = coupling.coupling_modules(root)
        if not found:
            return
        self._on_coupling(root, coupling.describe(root, found))

    def _on_coupling(self, root: nn.Module, where: str) -> None:
        strict = [e for e in self.extensions if e.coupled_samples == "raise"]
        if strict:
            raise RuntimeError(
                f"curvlib: {', '.join(type(e).__name__ for e in strict)} needs independent "
                f"samples, but {where} couples the samples of the batch (e.g. BatchNorm with "
                "batch statistics in training mode): per-sample gradients and exact curvature "
                "blocks are then not what this extension computes. Call model.eval() for the "
                "curvature backward (BatchNorm then uses its running statistics), or use KFAC, "
                "which treats the samples as independent (with a warning)."
            )
        loose = [e for e in self.extensions if e.coupled_samples == "warn"]
        if loose and root not in _WARNED_COUPLING:
            _WARNED_COUPLING.add(root)
            warnings.warn(
                f"curvlib: {', '.join(type(e).__name__ for e in loose)} treats the samples "
                f"as independent, but {where} couples them (e.g. BatchNorm with batch "
                "statistics in training mode); the result is the approximation with the "
                "coupling ignored. Call model.eval() for the curvature backward to avoid it.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------- loss
    def process_loss(self, loss: nn.Module, f: Tensor, y: Optional[Tensor], w: Tensor) -> None:
        """The backward reached the extended ``loss`` (input ``f``, target ``y``, ``w = d
        objective / d loss``): back-propagate the curvature cotangents to the pending layer calls."""
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
            self._set_empirical_scale(loss, weight / adapter.normalization(loss, f, y))
            cots, keys, derived = self._columns(adapter, loss, f, y, weight)
        if self.check_finite:
            finite_or_raise(cots, loss, "the loss curvature (model output)")
        # (calls recorded inside a backward are recomputations: never reached from here)
        calls = [c for c in state.TAPE.values() if c.live and not c.in_backward]
        demoted = {c.uid for c in calls if c.demoted}
        found = _demoted_edges(f_graph, demoted) if demoted else {}
        # calls of an earlier forward of their model that this loss does not reach get no
        # cotangents here (but zero columns, if another call of their layer gets some)
        unreached = [c for c in calls if c.demoted and c.uid not in found]
        calls = [c for c in calls if not c.demoted or c.uid in found]
        probe = self._coupling_probe(calls, f)
        if probe is not None:
            cots.append(probe)
            keys.append(_PROBE)
        for c in calls:  # reached by an earlier loss of this backward matrix-free: store those
            if c.lazy is not None:
                c.extra.update({k: c.lazy.columns(k) for k in c.lazy.V})
                c.lazy = None
        if not cots or not calls:
            return
        sizes = [S.shape[0] for S in cots]
        # reduced sources: not when a derived source needs the base columns stored
        streamed = set() if derived else {k for k in keys if k in self._reducers}
        if probe is None and not derived and not streamed:
            calls = self._leave_matrix_free(f_graph, calls, cots, keys)
            if not calls:
                return
        state.IN_EXTRA_BACKWARD = True
        try:
            roots = [c.root if c.root is not None else c.module for c in calls]
            edges = [found[c.uid] if c.demoted else c.output_edge for c in calls]
            shapes = [c.output_shape for c in calls]
            if streamed:
                grads, kept = self._stream_columns(
                    f_graph, edges, torch.cat(cots), roots, shapes, calls, keys, sizes, streamed
                )
            else:
                grads = backprop_columns(f_graph, edges, torch.cat(cots), roots, shapes)
        finally:
            state.IN_EXTRA_BACKWARD = False
        if not streamed:
            kept = {}
        calls = calls + unreached
        grads = _align_calls(calls, list(grads) + [None] * len(unreached))
        widths = dict(zip(keys, sizes))
        for key, (base, P) in derived.items():
            widths[key] = widths[base] // P
        self._align_pending(calls, grads, widths)
        for call, g in zip(calls, grads):
            if g is None:
                continue
            ck, cs = kept.get(call.uid, (keys, sizes))  # (reduced calls: the columns kept)
            parts = dict(zip(ck, g.split(cs)))
            for key, (base, P) in derived.items():  # shared columns = sums of spread ones
                parts[key] = parts[base].unflatten(0, (-1, P)).sum(1) if P > 1 else parts[base]
            for key, part in parts.items():
                if key is _PROBE:  # sample 0's output cotangent leaked into other samples?
                    if _same_batch(call, f) and bool(part[0, 1:].ne(0).any()):
                        self._leaks.add(call.uid)
                    continue
                old = call.extra.get(key)
                call.extra[key] = part if old is None else torch.cat([old, part])

    def _leave_matrix_free(self, f: Tensor, calls: List[LayerCall], cots: List[Tensor], keys: list) -> List[LayerCall]:
        """Give the earliest calls matrix-free columns (:mod:`curvlib.engine.lazy_columns`) where
        every extension of the context reads columns only through products
        (``Extension.lazy_columns``) and the cost model prefers it; returns the calls that still
        get stored columns."""
        if not all(getattr(e, "lazy_columns", False) for e in self.extensions):
            return calls
        K = sum(S.shape[0] for S in cots)
        ordered = sorted(calls, key=lambda c: c.uid)

        def eligible(c: LayerCall) -> bool:
            ps = [p for p in c.module.parameters(recurse=False) if p.requires_grad]
            return (  # (GGNMP applies a norm layer's scale, a summed parameter, from stored columns)
                bool(ps) and not adapter_for(c.module).summed_params and not c.demoted and not c.in_backward and not c.extra and _same_batch(c, f)
                and self._single_call(c) and all(p.dtype == f.dtype for p in ps) and c.input.dtype == f.dtype
            )

        def costs(ok):
            out = []
            for c, e in zip(ordered, ok):
                numel = math.prod(c.output_shape)
                n_params = sum(1 for p in c.module.parameters(recurse=False) if p.requires_grad)
                out.append((e, lazy_columns.forward_macs(c.module, numel), numel, n_params))
            return out

        ok = [eligible(c) for c in ordered]
        batched = column_chunk(cots[0], [c.output_shape for c in calls]) > 1
        cut = lazy_columns.plan(costs(ok), K, batched)
        if cut == 0:
            return calls
        supported = lazy_columns.supported_between(f, [c.output_edge for c in ordered[:cut]])
        if not all(supported):
            ok = [e and (i >= cut or supported[i]) for i, e in enumerate(ok)]
            cut = lazy_columns.plan(costs(ok), K, batched)
            if cut == 0:
                return calls
        chosen = ordered[:cut]
        state.IN_EXTRA_BACKWARD = True
        try:
            built = lazy_columns.build(
                f, [c.output_edge for c in chosen], [c.output_shape for c in chosen], dict(zip(keys, cots))
            )
        finally:
            state.IN_EXTRA_BACKWARD = False
        for c, lazy in zip(chosen, built):
            if lazy is None:  # (its output is f: the cut stops there)
                break
            c.lazy = lazy
        return [c for c in calls if c.lazy is None]

    def _stream_columns(self, f, edges, V, roots, shapes, calls, keys, sizes, streamed):
        """Back-propagate the columns ``V`` (blocks ``keys`` of ``sizes`` columns) chunk by chunk
        (:func:`~curvlib.engine.columns.column_chunks`): the columns of the ``streamed`` sources
        are folded into each call's column reductions (``call.reduced``) and dropped with their
        chunk; the others are gathered as before.

        Only calls of a layer with no other call in this backward are reduced (a layer called
        several times combines its calls' columns before reducing: norm layers' exact blocks
        sum the calls' per-sample gradients first); the others get all columns.

        Returns ``(grads, kept)``: ``grads`` one ``[K', *shape]`` tensor (or ``None``) per call
        with the gathered columns; ``kept``: ``call.uid -> (keys, sizes)`` of those columns for
        the reduced calls (the others: all of ``keys``, ``sizes``)."""
        bounds, o = [], 0
        for key, k in zip(keys, sizes):
            bounds.append((key, o, o + k))
            o += k
        single = [self._single_call(c) for c in calls]
        left = [(key, k0, k1) for key, k0, k1 in bounds if key not in streamed]
        dest, width = {}, 0
        for key, k0, k1 in left:
            dest[key] = width
            width += k1 - k0
        out: List[Optional[Tensor]] = [None] * len(calls)
        for start, grads in column_chunks(f, edges, V, roots, shapes):
            for i, g in enumerate(grads):
                if g is None:
                    continue
                if not single[i]:  # all columns, as backprop_columns gathers them
                    if out[i] is None:
                        out[i] = g.new_empty((o, *g.shape[1:]))
                    out[i][start : start + g.shape[0]] = g
                    continue
                stop = start + g.shape[0]
                for key, k0, k1 in bounds:
                    lo, hi = max(k0, start), min(k1, stop)
                    if lo >= hi:
                        continue
                    part = g[lo - start : hi - start]
                    if key in streamed:
                        self._reduce(calls[i], key, part)
                        continue
                    if out[i] is None:
                        out[i] = g.new_empty((width, *g.shape[1:]))
                    d = dest[key] + lo - k0
                    out[i][d : d + hi - lo] = part
            grads = g = part = None  # free the chunk before the next one
        kept = {c.uid: ([k for k, _, _ in left], [k1 - k0 for _, k0, k1 in left]) for c, s in zip(calls, single) if s}
        return out, kept

    def _single_call(self, call: LayerCall) -> bool:
        """Whether ``call``'s layer has no other call in this backward (captured or to come)."""
        return call.module not in self._pending and not _other_live_calls(call)

    def _reduce(self, call: LayerCall, key: Source, part: Tensor) -> None:
        """Fold a chunk ``part`` ``[c, *output_shape]`` of ``key``'s columns at ``call`` into the
        call's column reductions (one per reading extension; sums over the chunks)."""
        cap = LayerCapture(
            call.module, adapter_for(call.module), call.input, {key: part},
            self.empirical_scale if self.empirical_scale is not None else 1.0,
        )
        for eid, fn in self._reducers[key]:
            acc = call.reduced.setdefault((eid, key), {})
            _add_into(acc, fn(cap))

    def _align_pending(self, calls: List[LayerCall], grads: list, widths: Dict[Source, int]) -> None:
        """Zero columns of this loss for the already captured calls of a layer whose other
        calls this loss reaches: the backward can reach one call of a layer (a discriminator
        on fake data) before the hook of another loss (the one on real data) runs."""
        got = {c.module for c, g in zip(calls, grads) if g is not None}
        for module in got & set(self._pending):
            for cap in self._pending[module]:
                ref = cap.raw["grad"]
                for key, k in widths.items():
                    if key is _PROBE:
                        continue
                    zero = ref.new_zeros((k, *ref.shape[1:]))
                    old = cap.raw.get(key)
                    cap.raw[key] = zero if old is None else torch.cat([old, zero])

    def _columns(self, adapter, loss: nn.Module, f: Tensor, y: Optional[Tensor], weight: float):
        """The loss's cotangent columns to back-propagate, one block per source, and the
        sources derived from them without a backward of their own (canonical sources).

        ``"type-2"`` (columns shared over the output positions) and ``"type-2-exact"`` (one
        column per class and position) are the same columns when the output has one
        position per sample (``[N, C]``); with ``P`` positions the shared column ``k`` is
        the sum of the exact columns ``(k, p)`` over ``p``, and so is its back-propagation
        (the backward is linear in the cotangent). Both requested (e.g. ``KFAC`` and
        ``DiagGGN``, both ``fisher_type="type-2"``): only the exact columns are
        back-propagated, ``"type-2"`` is summed from them.

        Returns ``(cotangents, keys, derived)`` with ``derived``: key -> (base key, P).
        """
        cots: List[Tensor] = []
        keys: List[Source] = []
        derived: Dict[Source, Tuple[Source, int]] = {}
        sources = set(self.sources) - {"grad", "empirical"}
        poisoned = False
        if sources and not bool(torch.isfinite(f).all()):
            # sampling (torch.multinomial / bernoulli) fails on NaN with a torch error of its
            # own: raise the engine's error here, or (check_finite=False, the distributed
            # optimizer's mode) build the columns from a finite stand-in and poison them, so
            # that the non-finite value reaches the captures and every rank raises in step()
            if self.check_finite:
                finite_or_raise(f, loss, "the model output (the loss input)")
            f, poisoned = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0), True
        if {"type-2", "type-2-exact"} <= sources:
            derived["type-2"] = ("type-2-exact", adapter.type2_positions(f))
            sources.discard("type-2")
        for src in sorted(sources, key=str):
            if isinstance(src, tuple) and src[0] == "mc":
                S = adapter.mc_cotangents(loss, f, y, src[1], self.generator)
            else:
                S = adapter.type2_cotangents(loss, f, y, exact=src == "type-2-exact")
            if weight != 1.0:
                S = S * math.sqrt(weight)
            cots.append(torch.full_like(S, float("nan")) if poisoned else S)
            keys.append(src)
        return cots, keys, derived

    def _set_empirical_scale(self, loss: nn.Module, kappa: float) -> None:
        """``sqrt(1 / kappa)``: the ``"empirical"`` source ``grad * scale`` then gives
        ``sum_n s s^T = kappa sum_n grad l_n grad l_n^T`` (class docstring)."""
        for other, k in self._kappas:
            if "empirical" in self.sources and not math.isclose(k, kappa, rel_tol=1e-6):
                raise ValueError(
                    f"curvlib: fisher_type='empirical' with two extended losses in one "
                    f"backward that weight a sample differently: {other} with "
                    f"d objective/d loss / normalization = {k:.6g} and {loss} with {kappa:.6g}. "
                    "The empirical Fisher kappa * sum_n grad l_n grad l_n^T needs one per-sample "
                    "weight kappa. Use the same reduction and normalization for both losses "
                    "(e.g. reduction='sum' and one overall scale), or fisher_type 'type-2' / "
                    "'mc', which add up over losses."
                )
        self._kappas.append((loss, kappa))
        self.empirical_scale = 1.0 / math.sqrt(kappa) if kappa > 0 else 0.0

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
        self._check_coupling(call.root, call)
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
        state.TAPE.pop(call.uid, None)
        call.release()
        self._pending.setdefault(module, []).append(capture)
        if _other_live_calls(call):
            return  # another call of this layer is still to come (shared weights)
        self._run_group(module)

    def _run_group(self, module: nn.Module) -> None:
        """Run the extensions on the captured calls of ``module`` in this backward."""
        captures = self._pending.pop(module)
        capture = captures[0] if len(captures) == 1 else SharedCapture(captures)
        with torch.no_grad():
            for i, ext in enumerate(self.extensions):
                self._run_extension(i, ext, capture)
        # a part of a composite layer (attention's projections) counts for its owner
        self._processed.add(module if isinstance(module, nn.Module) else module.owner)
        self.num_captures += 1

    def _run_extension(self, i: int, ext: Extension, capture: LayerCapture) -> None:
        """``ext.compute`` and store, accumulating over the backwards of this context."""
        b = capture.backward
        earlier: Dict[str, Any] = {}
        for name, p in capture.params.items():
            prev = self._written.get((i, id(p)))
            if prev is None:
                continue
            if prev[1] == b:
                raise NotImplementedError(
                    f"curvlib: {ext.savefield} of the {name} of {capture.module} was computed "
                    "twice in one backward: the parameter belongs to two extended layers "
                    "(weight tying across modules, e.g. decoder.weight = encoder.weight). "
                    "A layer called several times is supported, one parameter shared by two "
                    "layers is not: call one module twice instead of tying two."
                )
            # taken off the parameter so that compute() does not reuse it as a buffer
            earlier[name] = p.__dict__.pop(ext.savefield, None)
        values = ext.compute(capture)
        n = ext.count(capture)
        for name, value in values.items():
            if ext.check_finite and self.check_finite:
                finite_or_raise(value, capture.module, f"{ext.savefield} of the {name}")
            p = getattr(capture.module, name)
            count = n
            if earlier.get(name) is not None:
                n_old = self._written[(i, id(p))][2]
                value = ext.accumulate(capture, name, earlier[name], value, (n_old, n))
                count = n_old + n
            setattr(p, ext.savefield, value)
            self._written[(i, id(p))] = (p, b, count)


#: key of the coupling probe among the extra cotangents
_PROBE = object()
#: model -> training modes in which the coupling probe ran
_PROBED: "weakref.WeakKeyDictionary[nn.Module, Set[bool]]" = weakref.WeakKeyDictionary()
#: models already warned about (coupled samples) / layers already warned about (no call)
_WARNED_COUPLING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_WARNED_UNCALLED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _other_live_calls(call: LayerCall) -> bool:
    """Whether another call of ``call``'s layer in the same (main or recomputing) backward is
    still live: recorded and not yet reached."""
    others = state.CALLS_OF.get(hooks.calls_key(call.module), ())
    return any(o is not call and o.live and o.in_backward == call.in_backward for o in others)


def _add_into(acc: Dict[str, Tensor], new: Dict[str, Tensor]) -> None:
    """``acc[name] += new[name]`` for a chunk's column reductions ``new``, in place (the first
    chunk's tensors are the reducer's own, :meth:`Extension.column_reduction`): no fresh
    ``[D, D]`` result per chunk. Names sharing one accumulator (KFAC's weight and bias ``G``)
    are added once when they share the addend too, else out of place."""
    groups: Dict[int, List[str]] = {}
    for name, v in new.items():
        if name not in acc:
            acc[name] = v
        else:
            groups.setdefault(id(acc[name]), []).append(name)
    for names in groups.values():
        total, addend = acc[names[0]], new[names[0]]
        shared = all(new[n] is addend for n in names) and sum(a is total for a in acc.values()) == len(names)
        if shared and not total.requires_grad and total.dtype == torch.promote_types(total.dtype, addend.dtype):
            total.add_(addend)
        else:
            for n in names:
                acc[n] = acc[n] + new[n]


def _same_batch(call: LayerCall, f: Tensor) -> bool:
    """Whether the leading dimension of the loss input ``f`` is the batch of ``call``'s layer
    (not so for an unbatched input, e.g. CE on ``[C]`` after a conv on ``[C_in, H, W]``, or
    for a pending call of another model)."""
    if call.input is None:
        return False
    n = adapter_for(call.module).batch_size(call.module, call.input)
    return n == f.shape[0] and n > 1


def _demoted_edges(f: Tensor, uids: Set[int]) -> Dict[int, Any]:
    """Gradient edges of the demoted calls ``uids`` (see ``hooks._demote_all``) that the
    graph of ``f`` reaches: a walk over the autograd nodes upstream of ``f``, reading the
    calls each node's ``metadata`` names. Only runs when a model ran several forwards
    before a backward (e.g. a GAN's discriminator on real and fake data)."""
    from curvlib.engine.hooks import META_KEY

    found: Dict[int, Any] = {}
    root = f.grad_fn
    if root is None:
        return found
    seen = {id(root): root}  # the wrappers are kept alive: ids stay unique
    stack = [root]
    while stack and len(found) < len(uids):
        node = stack.pop()
        calls = node.metadata.get(META_KEY) if node.metadata else None
        if calls:
            for nr, c in calls.items():
                if c.uid in uids:
                    found[c.uid] = torch.autograd.graph.GradientEdge(node, nr)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    return found


def _align_calls(calls: List[LayerCall], grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Give every live call of a layer the same cotangent columns: a loss whose columns
    reach one call of a layer but not another (a GAN's loss on real data does not reach the
    discriminator's call on fake data) gives zeros there, so that the calls' per-sample
    gradients add up column by column (:class:`SharedCapture`)."""
    by_module: Dict[nn.Module, List[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(c.module, []).append(i)
    for idx in by_module.values():
        if len(idx) < 2:
            continue
        ref = next((grads[i] for i in idx if grads[i] is not None), None)
        if ref is None:
            continue
        for i in idx:
            if grads[i] is None:
                grads[i] = ref.new_zeros((ref.shape[0], *calls[i].output_shape))
    return grads


__all__ = ["curvature"]
