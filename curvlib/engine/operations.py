"""Capture by operation: parameters outside adapted modules, and batch-1 outputs broadcast over the batch.

While an extended model runs its forward with gradients, :class:`OpCapture` (a
``TorchFunctionMode``, pushed by the model's root hooks on ``ENGINE.intercepts``) sees every torch
function call. It is active when the model has parameters that no layer adapter describes
(:func:`loose_parameters`: HF ``Conv1D``, ``LlamaRMSNorm``, ViT's ``cls_token``, a user module's
``self.W``), or from the moment a layer records a call on a batch of its own (below). It does three
things:

1. **Rules.** A call with such a parameter (requiring gradients) among its arguments goes to the
   rule registered for the function (``curvlib.engine.layers.OP_RULES``: matrix products,
   convolutions, embeddings, norms, elementwise broadcasts; one ``layers/op_*`` module each), which
   records the call of a *part* through the engine's ``record_call``. Views of a parameter
   (``W.T``, ``w.view(1, -1, 1)``, ``W.to(dtype)``) are followed, so ``x @ W.T`` is ``F.linear``.
   A parameter's use that no rule covers registers a hook on the operation's output that warns
   once, naming the parameter and the operation, when a curvature backward reaches it.
2. **Layouts.** Every tensor's batch layout is followed through the shape operations
   (:mod:`curvlib.engine.layers.batch_layout`), so that a rule knows exactly which rows of its
   input belong to which sample.
3. **Broadcast batches.** A layer call recorded on a batch of 1 (GPT-2 / BERT
   ``wpe(position_ids [1, T])``), or without the model's batch dimension (``wpe(arange(T))``), has
   its output *watched*. When an elementwise operation broadcasts that output against the batch
   (``inputs_embeds + position_embeds``), the capture gives it the output expanded to the batch
   (a view, same values) and re-records the call with the input expanded likewise: the expanded
   output's cotangent is per sample, so the layer's per-sample gradients (each sample's gradient
   through the broadcast) and KFAC (the samples' rows as positions) are exact. A batch-1 call that is
   not handled so (its output is used otherwise) raises at the curvature backward, naming the
   layer (``hooks``: never a result summed over the samples).

Cost: one Python call per torch function of the forward while active (a few microseconds each);
models whose parameters are all in adapted modules and whose layers all see the batch never
activate it.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlib.engine.layers import OP_RULES, adapter_for
from curvlib.engine.layers.batch_layout import ATTR, SHAPE_OPS, is_default, layout_of, propagate
from curvlib.engine.layers.op_broadcast import _BINARY, _INPLACE, _WHERE
from curvlib.engine.layers.ops import NOT_COVERED, OpCall, ParamUse
from curvlib.engine.state import ENGINE

_TB = torch._C.TensorBase

#: attribute of a tensor that is a view of a parameter: ``(param, kind)`` (:class:`ParamUse`)
PVIEW = "_curvlib_param_view"
#: attribute of a watched layer output: :class:`Watch`
WATCH = "_curvlib_watch"

#: functions that read a tensor's metadata only (answered without any bookkeeping)
_GETTERS = {
    getattr(_TB, n).__get__ for n in (
        "shape", "dtype", "device", "requires_grad", "grad_fn", "is_leaf", "ndim", "is_cuda", "layout",
        "data", "grad", "is_sparse", "is_quantized", "is_meta", "_base", "_version", "output_nr",
    ) if hasattr(_TB, n)
} | {
    getattr(_TB, n) for n in (
        "size", "dim", "numel", "is_floating_point", "is_contiguous", "stride", "data_ptr",
        "element_size", "storage_offset", "__len__", "item", "tolist", "is_complex", "nelement",
        "untyped_storage", "get_device", "__index__", "__bool__", "_is_view",
    ) if hasattr(_TB, n)
} | {
    torch.Tensor.__format__, torch.Tensor.__repr__, torch.Tensor.register_hook, torch.Tensor.__len__,
    torch.Tensor.__hash__, torch.is_grad_enabled, torch._C._set_grad_enabled, torch.is_tensor,
}
#: elementwise broadcasting functions (where a watched batch-1 output can meet the batch)
_BROADCASTING = frozenset(_BINARY + _INPLACE + _WHERE)


# ------------------------------------------------------------------ parameter views
def _same(args, kwargs, out, t):
    return "same" if out.shape == t.shape else None


def _reshaped(args, kwargs, out, t):
    return "same" if out.shape == t.shape else "reshaped"


def _transposed(args, kwargs, out, t):
    if t.ndim != 2:
        return "same" if out.shape == t.shape else None
    return "T"


def _indexed(args, kwargs, out, t):
    """``w[None, :, None]``: only new unit dimensions and whole slices keep the entries."""
    idx = args[1] if len(args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    ok = all(i is None or i is Ellipsis or isinstance(i, slice) and i == slice(None) for i in idx)
    return ("same" if out.shape == t.shape else "reshaped") if ok else None


#: functions whose output is a view (or a cast) of their first argument: -> its kind
_PARAM_VIEWS: Dict[Any, Callable] = {
    _TB.to: _same, _TB.type: _same, _TB.type_as: _same, _TB.float: _same, _TB.double: _same,
    _TB.half: _same, _TB.bfloat16: _same, _TB.contiguous: _same,
    _TB.view: _reshaped, _TB.reshape: _reshaped, _TB.unsqueeze: _reshaped, _TB.squeeze: _reshaped,
    _TB.flatten: _reshaped, _TB.unflatten: _reshaped, _TB.view_as: _reshaped, _TB.reshape_as: _reshaped,
    torch.reshape: _reshaped, torch.unsqueeze: _reshaped, torch.squeeze: _reshaped, torch.flatten: _reshaped,
    _TB.t: _transposed, torch.t: _transposed, _TB.T.__get__: _transposed, _TB.mT.__get__: _transposed,
    _TB.__getitem__: _indexed,
}


def _offset(args, kwargs, out, t):
    """``w + c`` / ``w - c`` for a number ``c`` (Gemma's ``1 + weight``): the same Jacobian."""
    other = args[1] if len(args) > 1 else kwargs.get("other")
    ok = isinstance(other, (int, float)) and not isinstance(other, bool) and out.shape == t.shape
    return "same" if ok else None


for _f in (_TB.add, _TB.sub, torch.add, torch.sub):
    _PARAM_VIEWS[_f] = _offset


def _transpose_pair(args, kwargs, out, t):
    return _transposed(args, kwargs, out, t) if t.ndim == 2 else None


for _f in (_TB.transpose, torch.transpose, _TB.permute, torch.permute, _TB.swapaxes, _TB.swapdims):
    _PARAM_VIEWS[_f] = _transpose_pair

#: kind of a view of a view
_COMPOSE = {
    ("same", "same"): "same", ("same", "T"): "T", ("same", "reshaped"): "reshaped",
    ("T", "same"): "T", ("T", "T"): "same", ("reshaped", "same"): "reshaped",
    ("reshaped", "reshaped"): "reshaped",
}


def op_name(func: Callable) -> str:
    """A readable name of a torch function: ``"F.linear"``, ``"torch.addmm"``, ``"Tensor.mul"``."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    qual = getattr(func, "__qualname__", "") or ""
    if qual.startswith(("TensorBase.", "Tensor.")) or getattr(func, "__objclass__", None) is _TB:
        return f"Tensor.{name.strip('_') if name.startswith('__') else name}"
    mod = getattr(func, "__module__", "") or ""
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"F.{name}"
    return f"torch.{name}"


# ------------------------------------------------------------------ parameters outside adapters
class LooseParameters:
    """The parameters of an extended model that no layer adapter describes, by ``id``:
    ``id(p) -> (p, qualified name, owner module)``; kept on the model (``_curvlib_loose``).

    A copy of the model (``copy.deepcopy``, pickle) gets an empty, stale instance, recomputed at its
    next forward (the ids are the original's)."""

    def __init__(self, root: Optional[nn.Module] = None):
        self.stale = root is None
        self.by_id: Dict[int, Tuple[nn.Parameter, str, nn.Module]] = {}
        if root is not None:
            self.by_id = loose_parameters(root)

    def __reduce_ex__(self, protocol):
        return (LooseParameters, ())

    def __deepcopy__(self, memo):
        return LooseParameters()


def loose_parameters(root: nn.Module) -> Dict[int, Tuple[nn.Parameter, str, nn.Module]]:
    """``id(p) -> (p, name, owner)`` for the parameters of ``root`` outside the adapters: those of
    modules without an adapter, and those besides ``weight`` / ``bias`` of a simple adapted module
    (a composite adapter, attention or a recurrent layer, describes all of its own). A parameter
    that an adapted layer applies is described there even where another module holds it too
    (tied: ALBERT's ``predictions.bias = decoder.bias``)."""
    out: Dict[int, Tuple[nn.Parameter, str, nn.Module]] = {}
    described = {}
    for mname, m in root.named_modules():
        adapter = adapter_for(m)
        for pname, p in m.named_parameters(recurse=False):
            described[id(p)] = described.get(id(p), False) or (
                adapter is not None and (adapter.composite or pname in ("weight", "bias")))
    for mname, m in root.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if described[id(p)]:  # also when tied to an adapted layer's (ALBERT's predictions.bias)
                continue
            out.setdefault(id(p), (p, f"{mname}.{pname}" if mname else pname, m))
    return out


# ------------------------------------------------------------------ watched outputs
@dataclass(eq=False)
class Watch:
    """A layer call recorded on a batch of its own (module docstring, 3.), kept on its output.

    Attributes:
        call: the recorded call (weak); ``module``: its layer; ``input``: its input (detached).
        batch: its batch size; ``root_batch``: the model's (``None`` if unknown).
        rewritten: the calls re-recorded on the expanded output (weak); ``other``: the first other
            operation that used the output (its name), if any.
    """

    call: Any
    module: Any
    input: Tensor
    batch: int
    root_batch: Optional[int]
    rewritten: List[Any] = field(default_factory=list)
    other: Optional[str] = None

    def message(self, N: int) -> str:
        return (
            f"curvlib: the output of {self.module} (computed on a batch of {self.batch}, input shape "
            f"{tuple(self.input.shape)}) is broadcast over the {N} samples of the batch, which curvlib "
            f"records per sample, but it is also used by {self.other}; the per-sample quantities of its "
            "parameters through that use cannot be separated from the other samples'. Use the "
            "output only in the operation that broadcasts it, or give the layer its input expanded to "
            "the batch (e.g. position_ids.expand(N, -1))."
        )


def _warn_uncovered(param: nn.Parameter, names: str, op: str, grad: Tensor) -> None:
    """Tensor hook on the output of an operation no rule covers (module docstring, 1.): warns
    once per parameter and operation, at a curvature backward."""
    if ENGINE.active is None or ENGINE.in_extra_backward:
        return None
    done = ENGINE.warned_ops.setdefault(param, set())
    if op in done:
        return None
    done.add(op)
    warnings.warn(
        f"curvlib: the parameter {names} reaches the loss through {op}, which no curvature rule "
        "covers; its curvature (if any) misses this use, and optimizers move a parameter without "
        "curvature by the plain gradient. Covered: F.linear and matrix products (addmm, matmul, @) "
        "with a 2-D parameter, conv* and conv_transpose*, F.embedding, the affine parameters of "
        "layer_norm / rms_norm / group_norm / batch_norm, a parameter broadcast over the samples "
        "by an elementwise add / sub / mul / div / where / expand, and the modules with an adapter "
        "(docs: layers and operations).",
        stacklevel=2,
    )
    return None


class OpCapture(TorchFunctionMode):
    """The operation capture of one extended model's forward (module docstring).

    Args:
        loose: :func:`loose_parameters` of the model.
        record: the engine's ``record_call(part, x, y) -> LayerCall``; ``drop``: releases a call
            (for a watched output re-recorded on the batch).
    """

    def __init__(self, loose: Dict[int, Tuple[nn.Parameter, str, nn.Module]], record: Callable, drop: Callable):
        super().__init__()
        self.loose, self._record, self._drop = loose, record, drop

    # ---------------------------------------------------------------- the rules' view
    def param_use(self, t: Tensor) -> Optional[ParamUse]:
        e = self.loose.get(id(t))
        if e is not None and e[0] is t:
            return ParamUse(t, t, e[1], e[2], "same") if t.requires_grad else None
        v = t.__dict__.get(PVIEW)
        if v is None:
            return None
        p, kind = v
        e = self.loose.get(id(p))
        if e is None or e[0] is not p or not p.requires_grad:
            return None
        return ParamUse(p, t, e[1], e[2], kind)

    def record(self, part: Any, x: Tensor, y: Tensor) -> Any:
        return self._record(part, x, y)

    # ---------------------------------------------------------------- every torch function
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GETTERS:
            return func(*args, **kwargs)
        grad = torch.is_grad_enabled()
        uses: List[ParamUse] = []
        watched: List[Tuple[int, Tensor]] = []
        laid = False  # an argument has a stored layout
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                laid |= self._scan(a, uses, watched, i, grad)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, Tensor):
                        laid |= self._scan(b, uses, watched, -1, grad)
        for a in kwargs.values():
            if isinstance(a, Tensor):
                laid |= self._scan(a, uses, watched, -1, grad)
        if uses:
            out = self._with_params(func, args, kwargs, uses)
        elif watched and func in _BROADCASTING:
            out, handled = self._broadcast(func, args, kwargs, watched)
            watched = [(i, t) for i, t in watched if i not in handled]
        else:
            out = func(*args, **kwargs)
        if laid or func in SHAPE_OPS:
            propagate(func, args, kwargs, out)
        if watched:
            self._other_uses(func, watched, out)
        return out

    def _scan(self, t: Tensor, uses: List[ParamUse], watched: list, i: int, grad: bool) -> bool:
        """Note a parameter use (with gradients) or a watched output among the arguments; whether
        ``t`` has a stored layout."""
        d = t.__dict__
        if grad:
            if id(t) in self.loose or PVIEW in d:
                u = self.param_use(t)
                if u is not None:
                    uses.append(u)
            if WATCH in d:
                watched.append((i, t))
        return ATTR in d

    def _with_params(self, func, args, kwargs, uses: List[ParamUse]):
        rule = OP_RULES.get(func)
        name = None
        if rule is not None:
            name = op_name(func)
            out = rule.capture(OpCall(self, func, args, kwargs, name))
            if out is not NOT_COVERED:
                return out
        out = func(*args, **kwargs)
        view = _PARAM_VIEWS.get(func)
        if view is not None and len(uses) == 1 and args and args[0] is uses[0].tensor and isinstance(out, Tensor):
            kind = view(args, kwargs, out, uses[0].tensor)
            kind = _COMPOSE.get((uses[0].kind, kind)) if kind is not None else None
            if kind is not None:
                setattr(out, PVIEW, (uses[0].param, kind))
                return out
        self._uncovered(name or op_name(func), uses, out)
        return out

    @staticmethod
    def _uncovered(op: str, uses: List[ParamUse], out: Any) -> None:
        first = next((o for o in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(o, Tensor) and o.requires_grad), None)
        if first is None:
            return
        names = ", ".join(f"'{u.name}'" for u in uses)
        first.register_hook(functools.partial(_warn_uncovered, uses[0].param, names, op))

    # ---------------------------------------------------------------- broadcast batches
    def _broadcast(self, func, args, kwargs, watched):
        """Expand the watched outputs that ``func`` broadcasts over the batch (module docstring, 3.);
        returns ``(value, positions of the handled arguments)``."""
        tensors = [a for a in args if isinstance(a, Tensor)]
        try:
            out = torch.broadcast_shapes(*[t.shape for t in tensors])
        except RuntimeError:
            return func(*args, **kwargs), set()
        new, handled = list(args), set()
        for i, t in watched:
            if i < 0:
                continue
            w: Watch = t.__dict__[WATCH]
            k, N = len(out) - t.ndim, out[0] if out else 1
            if k == 0 and t.shape[0] == 1 and N > 1 and w.root_batch in (None, N):
                x, e = w.input.expand(N, *w.input.shape[1:]), t.expand(N, *t.shape[1:])
            elif k == 1 and w.root_batch is not None and N == w.root_batch and w.batch != N:
                x, e = w.input.unsqueeze(0).expand(N, *w.input.shape), t.expand(N, *t.shape)
            else:
                continue
            if not any(o is not t and o.ndim == len(out) and o.shape[0] == N and is_default(o, layout_of(o))
                       for o in tensors):
                continue  # the batch comes from no operand with the samples in dimension 0
            call = w.call() if w.call is not None else None
            if call is not None:
                self._drop(call)
                w.call = None
            rec = self._record(w.module, x, e)
            if rec is not None:
                w.rewritten.append(weakref.ref(rec))
                if w.other is not None:
                    rec.error = w.message(N)
            new[i] = e
            handled.add(i)
        return func(*new, **kwargs), handled

    @staticmethod
    def _other_uses(func, watched, out) -> None:
        """A watched output used by ``func`` otherwise than broadcast over the batch."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return
        for _, t in watched:
            if any(o is t for o in outs):
                continue  # returned itself (e.g. .to() of the same device)
            w: Watch = t.__dict__[WATCH]
            if w.other is None:
                w.other = op_name(func)
            for ref in w.rewritten:
                c = ref()
                if c is not None and c.error is None:
                    c.error = w.message(c.input.shape[0] if c.input is not None else 0)


__all__ = ["OpCapture", "LooseParameters", "loose_parameters", "Watch", "op_name", "PVIEW", "WATCH"]
