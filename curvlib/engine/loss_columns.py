"""The loss's cotangent columns: built at an extended loss, carried to the layer calls.

When an extension of the ``curvature`` context needs ``"mc"`` or ``"type-2"`` cotangents, the
backward reaching an extended loss (input ``f``) builds ``K`` columns ``V [K, *f.shape]`` (the
loss adapter's sampled gradients or loss-Hessian square root, times ``sqrt(w)`` for ``w = d
objective / d loss``; :meth:`LossColumns.build`) and back-propagates them to the outputs of the
live layer calls of that backward (:meth:`LossColumns.deliver`), where they wait in
``call.extra`` for the layer's own hook. How they travel:

- stored: :func:`~curvlib.engine.columns.backprop_columns` gathers ``[K, *output_shape]`` per
  call (the default);
- streamed: sources every reader of which only sums over the columns
  (``Extension.column_reduction``) are folded into ``call.reduced`` chunk by chunk and freed
  (:meth:`LossColumns._stream`);
- matrix-free: where every extension reads columns through products only
  (``Extension.lazy_columns``) and the cost model prefers it, the earliest calls get
  :class:`~curvlib.engine.lazy_columns.LazyColumns` instead (:meth:`LossColumns._leave_matrix_free`);
- aligned: the calls of a layer called several times get the same columns, zeros where a
  loss does not reach a call (:func:`align_calls`, :func:`align_pending`; a GAN's
  discriminator on real and fake data), so that their per-sample gradients add up.

The ``"empirical"`` source needs no columns, only the per-sample weight of the loss
(:func:`empirical_scale`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import lazy_columns
from curvlib.engine.capture import LayerCapture, Source, all_finite, finite_or_raise
from curvlib.engine.columns import backprop_columns, column_chunk, column_chunks
from curvlib.engine.coupling import PROBE, CouplingCheck, same_batch
from curvlib.engine.hooks import META_KEY, calls_key
from curvlib.engine.layers import adapter_for
from curvlib.engine.records import LayerCall
from curvlib.engine.state import ENGINE


@dataclass
class Columns:
    """The columns of one loss: ``blocks[i]`` ``[k_i, *f.shape]`` for source ``keys[i]``, and the
    sources derived from them without a backward of their own (``derived``: key -> (base key,
    ``P``), the base's columns summed over groups of ``P``)."""

    blocks: List[Tensor] = field(default_factory=list)
    keys: List[Any] = field(default_factory=list)
    derived: Dict[Source, Tuple[Source, int]] = field(default_factory=dict)

    def add(self, key: Any, V: Tensor) -> None:
        self.blocks.append(V)
        self.keys.append(key)

    @property
    def sizes(self) -> List[int]:
        return [V.shape[0] for V in self.blocks]

    def widths(self) -> Dict[Any, int]:
        """Columns per source, the derived ones included."""
        widths = dict(zip(self.keys, self.sizes))
        for key, (base, P) in self.derived.items():
            widths[key] = widths[base] // P
        return widths

    def split(self, g: Tensor, keys: Optional[List[Any]] = None, sizes: Optional[List[int]] = None) -> Dict[Any, Tensor]:
        """The back-propagated columns ``g`` ``[K', *shape]`` (``keys`` of ``sizes`` columns, by
        default all) by source, the derived sources summed from their base (shared columns =
        sums of spread ones)."""
        keys, sizes = (self.keys, self.sizes) if keys is None else (keys, sizes)
        parts = dict(zip(keys, g.split(sizes)))
        for key, (base, P) in self.derived.items():
            parts[key] = parts[base].unflatten(0, (-1, P)).sum(1) if P > 1 else parts[base]
        return parts


def empirical_scale(kappas: List[Tuple[nn.Module, float]], loss: nn.Module, kappa: float, empirical: bool) -> float:
    """``sqrt(1 / kappa)`` for the sample weight ``kappa = w / N'`` of ``loss`` (appended to the
    backward's ``kappas``): the ``"empirical"`` source ``grad * scale`` then gives ``sum_n s s^T
    = kappa sum_n grad l_n grad l_n^T`` (``curvature``'s docstring). With ``empirical`` (the
    source is read), every loss of one backward must weight a sample alike."""
    for other, k in kappas:
        if empirical and not math.isclose(k, kappa, rel_tol=1e-6):
            raise ValueError(
                f"curvlib: fisher_type='empirical' with two extended losses in one "
                f"backward that weight a sample differently: {other} with "
                f"d objective/d loss / normalization = {k:.6g} and {loss} with {kappa:.6g}. "
                "The empirical Fisher kappa * sum_n grad l_n grad l_n^T needs one per-sample "
                "weight kappa. Use the same reduction and normalization for both losses "
                "(e.g. reduction='sum' and one overall scale), or fisher_type 'type-2' / "
                "'mc', which add up over losses."
            )
    kappas.append((loss, kappa))
    return 1.0 / math.sqrt(kappa) if kappa > 0 else 0.0


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: a CUDA device's total, else the machine's physical memory
    (``0``: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_column_memory(adapter, loss: nn.Module, f: Tensor, exact: bool) -> None:
    """Refuse type-2 columns that cannot fit in memory, before allocating them: the exact loss
    Hessian square root has one column per class (times the output positions for the exact
    per-position columns), each the size of the model output, so a 50,000-token vocabulary over
    8 x 16 tokens asks for ``50,000 * 6.4e6 * 4`` bytes = 1.28 TB. ``MemoryError`` naming the loss,
    the size and the fix (``"mc"``: ``mc_samples`` columns)."""
    C = f.shape[adapter.class_dim % f.ndim] if f.ndim > 1 else f.shape[0]
    K = C * (adapter.type2_positions(f) if exact else 1)
    need = K * f.numel() * f.element_size()
    have = device_memory(f.device)
    if have and need > have:
        raise MemoryError(
            f"curvlib: fisher_type='type-2' at {loss} (model output {tuple(f.shape)}, {C} classes) needs "
            f"{K} loss-Hessian columns of the output's size: {need / 2**30:.1f} GiB, more than the "
            f"{have / 2**30:.1f} GiB of {f.device}. Use fisher_type='mc' (mc_samples columns, an unbiased "
            "estimate of the same Fisher) or 'empirical' for this loss."
        )


def reached_calls(f: Tensor) -> Tuple[List[LayerCall], Dict[int, Any], List[LayerCall]]:
    """The live calls of this backward that the loss input ``f`` can reach: ``(calls, found,
    unreached)`` with ``found`` the gradient edges of the demoted ones among them (calls of an
    earlier forward of their model, :func:`demoted_edges`) and ``unreached`` the demoted calls
    ``f`` does not reach (they get no columns from this loss, but zero columns if another call
    of their layer gets some). Calls recorded inside a backward are recomputations and never
    reached from here."""
    calls = [c for c in ENGINE.tape.values() if c.live and not c.in_backward]
    demoted = {c.uid for c in calls if c.demoted}
    found = demoted_edges(f, demoted) if demoted else {}
    unreached = [c for c in calls if c.demoted and c.uid not in found]
    return [c for c in calls if not c.demoted or c.uid in found], found, unreached


def demoted_edges(f: Tensor, uids: Set[int]) -> Dict[int, Any]:
    """Gradient edges of the demoted calls ``uids`` (see ``hooks._demote_all``) that the
    graph of ``f`` reaches: a walk over the autograd nodes upstream of ``f``, reading the
    calls each node's ``metadata`` names. Only runs when a model ran several forwards
    before a backward (e.g. a GAN's discriminator on real and fake data)."""
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


def other_live_calls(call: LayerCall) -> bool:
    """Whether another call of ``call``'s layer (or of a layer sharing a parameter with it) in the
    same (main or recomputing) backward is still live: recorded and not yet reached."""
    others = ENGINE.calls_of.get(calls_key(call.module), ())
    return any(o is not call and o.live and o.in_backward == call.in_backward for o in others)


def align_calls(calls: List[LayerCall], grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Give every live call of a layer (and of the layers sharing a parameter with it,
    ``hooks.calls_key``) the same cotangent columns: a loss whose columns reach one call of a
    layer but not another (a GAN's loss on real data does not reach the discriminator's call on
    fake data) gives zeros there, so that the calls' per-sample gradients add up column by column
    (:class:`~curvlib.engine.capture.SharedCapture`, :class:`~curvlib.engine.tying.TiedCapture`)."""
    by_module: Dict[object, List[int]] = {}
    for i, c in enumerate(calls):  # by calls_key: a layer, or the layers sharing a parameter
        by_module.setdefault(calls_key(c.module), []).append(i)
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


def align_pending(
    pending: Dict[object, List[LayerCapture]], calls: List[LayerCall], grads: list, widths: Dict[Any, int]
) -> None:
    """Zero columns of this loss for the already captured calls (``pending``) of a layer whose
    other calls this loss reaches: the backward can reach one call of a layer (a discriminator
    on fake data) before the hook of another loss (the one on real data) runs."""
    got = {calls_key(c.module) for c, g in zip(calls, grads) if g is not None}
    for module in got & set(pending):
        for cap in pending[module]:
            ref = cap.raw["grad"]
            for key, k in widths.items():
                if key is PROBE:
                    continue
                zero = ref.new_zeros((k, *ref.shape[1:]))
                old = cap.raw.get(key)
                cap.raw[key] = zero if old is None else torch.cat([old, zero])


def add_into(acc: Dict[str, Tensor], new: Dict[str, Tensor]) -> None:
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


class LossColumns:
    """The loss's columns for one ``curvature`` context (module docstring).

    Args:
        extensions: the context's extensions; ``sources`` the union of their sources.
        check_finite: raise at a non-finite loss input (else poison the columns, for a caller
            that checks the captures itself).
        coupling: the context's coupled-sample check (its probe column travels with the others).
    """

    def __init__(
        self, extensions: Sequence, sources: Set[Source], check_finite: bool, coupling: CouplingCheck
    ):
        self.extensions = list(extensions)
        self.sources = sources
        self.check_finite = check_finite
        self.coupling = coupling
        #: sources every reader of which sums its columns (``Extension.column_reduction``):
        #: back-propagated in chunks, reduced and freed (never stored on the captures)
        self.reducers: Dict[Source, List[Tuple[Any, Any]]] = {}
        for src in sources - {"grad", "empirical"}:
            readers = [e for e in extensions if src in e.sources()]
            fns = [e.column_reduction(src) for e in readers]
            if readers and all(fn is not None for fn in fns):
                self.reducers[src] = [(e, fn) for e, fn in zip(readers, fns)]

    def build(
        self, adapter, loss: nn.Module, f: Tensor, y: Optional[Tensor], weight: float, generator: Optional[torch.Generator]
    ) -> Columns:
        """The loss's cotangent columns to back-propagate, one block per source, and the
        sources derived from them without a backward of their own (canonical sources);
        ``generator`` draws the ``"mc"`` targets (``None``: the global RNG).

        ``"type-2"`` (columns shared over the output positions) and ``"type-2-exact"`` (one
        column per class and position) are the same columns when the output has one
        position per sample (``[N, C]``); with ``P`` positions the shared column ``k`` is
        the sum of the exact columns ``(k, p)`` over ``p``, and so is its back-propagation
        (the backward is linear in the cotangent). Both requested (e.g. ``KFAC`` and
        ``DiagGGN``, both ``fisher_type="type-2"``): only the exact columns are
        back-propagated, ``"type-2"`` is summed from them.
        """
        cols = Columns()
        sources = set(self.sources) - {"grad", "empirical"}
        poisoned = False
        if sources and not all_finite(f):
            # sampling breaks on NaN (torch.bernoulli with a torch error of its own, the
            # categorical sampler's cumsum silently): raise the engine's error here, or
            # (check_finite=False, the distributed
            # optimizer's mode) build the columns from a finite stand-in and poison them, so
            # that the non-finite value reaches the captures and every rank raises in step()
            if self.check_finite:
                finite_or_raise(f, loss, "the model output (the loss input)")
            f, poisoned = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0), True
        if {"type-2", "type-2-exact"} <= sources:
            cols.derived["type-2"] = ("type-2-exact", adapter.type2_positions(f))
            sources.discard("type-2")
        for src in sorted(sources, key=str):
            if isinstance(src, tuple) and src[0] == "mc":
                S = adapter.mc_cotangents(loss, f, y, src[1], generator)
            else:
                check_column_memory(adapter, loss, f, exact=src == "type-2-exact")
                S = adapter.type2_cotangents(loss, f, y, exact=src == "type-2-exact")
            if weight != 1.0:
                S = S.mul_(math.sqrt(weight))  # (the adapter's fresh columns)
            cols.add(src, torch.full_like(S, float("nan")) if poisoned else S)
        return cols

    def deliver(
        self, f_graph: Tensor, cols: Columns, pending: Dict[object, List[LayerCapture]], empirical_scale: float
    ) -> None:
        """Back-propagate ``cols`` from the loss input ``f_graph`` to the live calls it reaches
        (and the coupling probe's column, when one is due) into ``call.extra`` / ``call.reduced``
        / ``call.lazy``; ``pending``: the backward's captured calls still waiting for other
        calls of their layer (they get zero columns where needed)."""
        f = f_graph.detach()
        calls, found, unreached = reached_calls(f_graph)
        probe = self.coupling.probe(calls, f)
        if probe is not None:
            cols.add(PROBE, probe)
        for c in calls:  # reached by an earlier loss of this backward matrix-free: store those
            if c.lazy is not None:
                c.extra.update({k: c.lazy.columns(k) for k in c.lazy.V})
                c.lazy = None
        if not cols.blocks or not calls:
            return
        keys, sizes = cols.keys, cols.sizes
        # reduced sources: not when a derived source needs the base columns stored
        streamed = set() if cols.derived else {k for k in keys if k in self.reducers}
        if probe is None and not cols.derived and not streamed:
            calls = self._leave_matrix_free(f_graph, calls, cols, pending)
            if not calls:
                return
        kept: Dict[int, Tuple[list, list]] = {}
        with ENGINE.extra_backward():
            roots = [c.root if c.root is not None else c.module for c in calls]
            edges = [found[c.uid] if c.demoted else c.output_edge for c in calls]
            shapes = [c.output_shape for c in calls]
            V = cols.blocks[0] if len(cols.blocks) == 1 else torch.cat(cols.blocks)  # (no copy of one block)
            if streamed:
                single = [self._single_call(c, pending) for c in calls]
                reduce = functools.partial(self._reduce, empirical_scale=empirical_scale)
                chunks = column_chunks(f_graph, edges, V, roots, shapes)
                grads, kept = self._stream(chunks, calls, cols, streamed, single, reduce)
            else:
                grads = backprop_columns(f_graph, edges, V, roots, shapes)
        calls = calls + unreached
        grads = align_calls(calls, list(grads) + [None] * len(unreached))
        align_pending(pending, calls, grads, cols.widths())
        for call, g in zip(calls, grads):
            if g is None:
                continue
            ck, cs = kept.get(call.uid, (keys, sizes))  # (reduced calls: the columns kept)
            for key, part in cols.split(g, ck, cs).items():
                if key is PROBE:  # sample 0's output cotangent leaked into other samples?
                    self.coupling.observe(call, part, f)
                    continue
                old = call.extra.get(key)
                call.extra[key] = part if old is None else torch.cat([old, part])

    @staticmethod
    def _single_call(call: LayerCall, pending: Dict[object, List[LayerCapture]]) -> bool:
        """Whether ``call``'s layer has no other call in this backward (captured or to come)."""
        return calls_key(call.module) not in pending and not other_live_calls(call)

    def _leave_matrix_free(
        self, f: Tensor, calls: List[LayerCall], cols: Columns, pending: Dict[object, List[LayerCapture]]
    ) -> List[LayerCall]:
        """Give the earliest calls matrix-free columns (:mod:`curvlib.engine.lazy_columns`) where
        every extension of the context reads columns only through products
        (``Extension.lazy_columns``) and the cost model prefers it; returns the calls that still
        get stored columns."""
        if not all(getattr(e, "lazy_columns", False) for e in self.extensions):
            return calls
        cots, keys = cols.blocks, cols.keys
        K = sum(S.shape[0] for S in cots)
        ordered = sorted(calls, key=lambda c: c.uid)

        def eligible(c: LayerCall) -> bool:
            ps = [p for p in c.module.parameters(recurse=False) if p.requires_grad]
            return (  # (GGNMP applies a norm layer's scale, a summed parameter, from stored columns)
                bool(ps) and not adapter_for(c.module).summed_params and not c.demoted and not c.in_backward and not c.extra and same_batch(c, f)
                and self._single_call(c, pending) and all(p.dtype == f.dtype for p in ps) and c.input.dtype == f.dtype
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
        with ENGINE.extra_backward():
            built = lazy_columns.build(
                f, [c.output_edge for c in chosen], [c.output_shape for c in chosen], dict(zip(keys, cots))
            )
        for c, lazy in zip(chosen, built):
            if lazy is None:  # (its output is f: the cut stops there)
                break
            c.lazy = lazy
        return [c for c in calls if c.lazy is None]

    @staticmethod
    def _stream(
        chunks: Iterator[Tuple[int, List[Optional[Tensor]]]], calls: List[LayerCall], cols: Columns,
        streamed: Set[Source], single: List[bool], reduce: Callable[..., None],
    ):
        """Gather the back-propagated ``cols`` chunk by chunk (``chunks`` from
        :func:`~curvlib.engine.columns.column_chunks`): the columns of the ``streamed`` sources
        are folded into each call's column reductions (``reduce(call, key, part)``) and dropped
        with their chunk; the others are gathered as before.

        Only calls of a layer with no other call in this backward (``single``) are reduced (a
        layer called several times combines its calls' columns before reducing: norm layers'
        exact blocks sum the calls' per-sample gradients first); the others get all columns.

        Returns ``(grads, kept)``: ``grads`` one ``[K', *shape]`` tensor (or ``None``) per call
        with the gathered columns; ``kept``: ``call.uid -> (keys, sizes)`` of those columns for
        the reduced calls (the others: all of ``keys``, ``sizes``)."""
        bounds, o = [], 0
        for key, k in zip(cols.keys, cols.sizes):
            bounds.append((key, o, o + k))
            o += k
        left = [(key, k0, k1) for key, k0, k1 in bounds if key not in streamed]
        dest, width = {}, 0
        for key, k0, k1 in left:
            dest[key] = width
            width += k1 - k0
        out: List[Optional[Tensor]] = [None] * len(calls)
        for start, grads in chunks:
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
                        reduce(calls[i], key, part)
                        continue
                    if out[i] is None:
                        out[i] = g.new_empty((width, *g.shape[1:]))
                    d = dest[key] + lo - k0
                    out[i][d : d + hi - lo] = part
            grads = g = part = None  # free the chunk before the next one
        kept = {c.uid: ([k for k, _, _ in left], [k1 - k0 for _, k0, k1 in left]) for c, s in zip(calls, single) if s}
        return out, kept

    def _reduce(self, call: LayerCall, key: Source, part: Tensor, empirical_scale: Optional[float]) -> None:
        """Fold a chunk ``part`` ``[c, *output_shape]`` of ``key``'s columns at ``call`` into the
        call's column reductions (one per reading extension; sums over the chunks)."""
        cap = LayerCapture(
            call.module, adapter_for(call.module), call.input, {key: part},
            empirical_scale if empirical_scale is not None else 1.0,
        )
        for ext, fn in self.reducers[key]:
            names = [n for n, p in cap.params.items() if ext.selects(p)]
            if not names:  # (an extension restricted to other parameters: nothing to build here)
                continue
            acc = call.reduced.setdefault((id(ext), key), {})
            add_into(acc, fn(cap if len(names) == len(cap.params) else cap.restricted(names)))


__all__ = [
    "Columns", "LossColumns", "empirical_scale", "reached_calls", "demoted_edges", "other_live_calls",
    "align_calls", "align_pending", "add_into",
]
