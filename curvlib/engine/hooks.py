"""``extend``: forward hooks that record what the backward pass will need.

A forward hook on each extended layer keeps a reference to the layer input (autograd
keeps it anyway) and the gradient edge of the layer output, and puts a tensor hook on
the output. A forward hook on an extended loss puts a tensor hook on the loss value.
Nothing is computed until a backward runs inside a ``curvature`` context.
"""
from __future__ import annotations

import functools
import itertools
import weakref
from typing import ContextManager, Optional, TypeVar

import torch
from torch import Tensor, nn

from curvlib.engine.state import ENGINE
from curvlib.engine.layers import adapter_for
from curvlib.engine.layers.batch_layout import ATTR, Layout, graph_layout, is_default, per_sample, restore
from curvlib.engine.losses import loss_adapter_for
from curvlib.engine.operations import WATCH, LooseParameters, OpCapture, Watch
from curvlib.engine.records import CallList, LayerCall
from curvlib.engine.tying import group_key, note_params

M = TypeVar("M", bound=nn.Module)

_FLAG = "_curvlib_extended"
_ROOT_FLAG = "_curvlib_root"

_CALLS = "_curvlib_calls"
_LOOSE = "_curvlib_loose"


def hooks_paused() -> ContextManager[None]:
    """Run extended models without recording anything (for extensions that re-run the
    model themselves, e.g. HMP's functional forward): the tape is left untouched."""
    return ENGINE.hooks_paused()


def _detached(x):
    return x.detach() if isinstance(x, Tensor) else x


def extend(module: M) -> M:
    """Prepare a model or a loss module for curvature capture; returns ``module``.

    Args:
        module: the model (any ``nn.Module``; it is not copied, wrapped or rewritten: hooks are
            registered on it and it is returned) or a loss module.

    Returns:
        ``module`` itself, so ``model = extend(model)`` and ``extend(model)`` are the same.

    For a model, every sub-layer with an adapter (Linear, ConvNd and ConvTransposeNd incl.
    grouped, Embedding, LayerNorm, RMSNorm, GroupNorm, BatchNormNd, MultiheadAttention, LSTM, GRU,
    RNN and their cells; the table ``curvlib.engine.layers.ADAPTERS``) is hooked (attention and the
    recurrent layers, which apply their parameters functionally, record their linear parts through
    their adapter's interception), and a layer an adapter refuses (e.g. a configuration it does not
    support) raises here, naming it. The other parameters (of modules without an adapter, e.g. HF
    ``Conv1D`` or ``LlamaRMSNorm``) are captured by the operations that apply them while the model's
    forward runs (:mod:`curvlib.engine.operations`: ``F.linear``, ``@``, ``conv*``,
    ``F.embedding``, the norm functions, elementwise broadcasts); a parameter that reaches the loss
    through an operation no rule covers is named, with the operation, in a warning at the
    curvature backward. For a loss
    (CrossEntropyLoss, NLLLoss, MSELoss, BCEWithLogitsLoss) the loss value is hooked so that
    ``fisher_type="mc"`` and ``"type-2"`` can back-propagate the loss's curvature; another
    ``_Loss`` raises ``NotImplementedError`` (use ``fisher_type="empirical"`` with it, unextended).
    Idempotent: extending twice registers nothing new. Extend before the forward whose backward
    you capture; the code between layers (activations, pooling, residual additions, reshapes)
    needs nothing.

    The hooks record only during forwards with gradients enabled (references to the layer
    inputs, which autograd keeps anyway), and compute nothing unless a backward runs inside a
    :class:`curvature` context.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> extend(net) is net
        True
        >>> loss_fn = extend(nn.MSELoss())     # for fisher_type "mc" and "type-2"
        >>> extend(nn.L1Loss())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        NotImplementedError: curvlib: the loss L1Loss() is not supported; ...
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"curvlib.extend expects a torch.nn.Module, got {type(module)}.")
    if loss_adapter_for(module) is not None:
        if not getattr(module, _FLAG, False):
            module.register_forward_hook(_loss_forward_hook)
            setattr(module, _FLAG, True)
        return module
    if isinstance(module, nn.modules.loss._Loss):
        raise NotImplementedError(
            f"curvlib: the loss {module} is not supported; use CrossEntropyLoss, NLLLoss, "
            "MSELoss or BCEWithLogitsLoss (or fisher_type='empirical' without extend)."
        )

    if not getattr(module, _ROOT_FLAG, False):
        module.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
        module.register_forward_hook(_root_post_hook, always_call=True)
        setattr(module, _ROOT_FLAG, True)
    for name, sub in module.named_modules():
        adapter = adapter_for(sub)
        if adapter is not None:
            adapter.check(sub)
            if not getattr(sub, _FLAG, False):
                if adapter.composite:
                    sub.register_forward_pre_hook(_composite_pre_hook)
                    sub.register_forward_hook(_composite_post_hook, always_call=True)
                else:
                    sub.register_forward_hook(_layer_forward_hook)
                setattr(sub, _FLAG, True)
    # the parameters no adapter describes: captured by operation (curvlib.engine.operations)
    setattr(module, _LOOSE, LooseParameters(module))
    return module


def _root_pre_hook(root: nn.Module, args, kwargs) -> None:
    if ENGINE.paused:
        return None
    # a new forward of this model: the calls of its earlier forward stay alive exactly as
    # long as their autograd graph (a GAN's discriminator on real, then on fake data)
    _demote_all(getattr(root, _CALLS, ()))
    calls = CallList()
    calls.root_batch = _batch_of(args, kwargs)
    setattr(root, _CALLS, calls)
    inputs = (tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})
    ENGINE.forwards.append((root, inputs))
    if ENGINE.op_capture is None and torch.is_grad_enabled():
        loose = _loose(root)
        if any(e[0].requires_grad for e in loose.values()):
            _push_op_capture(root, loose)
    return None


def _batch_of(args, kwargs) -> Optional[int]:
    """The batch size of a forward: dimension 0 of the first argument with at least 2 dimensions
    (``None`` if there is none: an unbatched input, or no tensor)."""
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, Tensor) and a.ndim >= 2:
            return a.shape[0]
    return None


def _loose(root: nn.Module):
    """The parameters of ``root`` no adapter describes (:class:`LooseParameters`, computed at
    ``extend`` and again for a copy of the model)."""
    lp = getattr(root, _LOOSE, None)
    if lp is None or lp.stale:
        lp = LooseParameters(root)
        setattr(root, _LOOSE, lp)
    return lp.by_id


def _push_op_capture(root: nn.Module, loose) -> bool:
    """Activate the operation capture for the rest of ``root``'s forward (not inside a composite
    layer's interception, which must be left last-in first-out; not under ``torch.func``
    transforms, whose wrapped tensors have no autograd graph of their own)."""
    if ENGINE.intercepts and not isinstance(ENGINE.intercepts[-1][1], OpCapture):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    cm = OpCapture(loose, record_call, _drop_call)
    cm.__enter__()
    ENGINE.intercepts.append((root, cm))
    ENGINE.op_capture = cm
    return True


def _release_all(calls) -> None:
    for call in calls:
        ENGINE.tape.pop(call.uid, None)
        call.release()


#: key of the ``{output_nr: LayerCall}`` dict a demoted call leaves in its output node's
#: ``metadata``
META_KEY = "curvlib_calls"


def _demote_all(calls) -> None:
    """Hand the not yet back-propagated ``calls`` of an earlier forward to their own graph.

    The model owns the calls of its latest forward (and, through their output edges, that
    graph). When it runs again, an earlier call moves into the ``metadata`` of its output's
    autograd node and drops the edge: it then lives exactly as long as the graph that can
    still back-propagate to it (a discriminator's forward on real data, kept by the loss;
    a discarded forward is freed with its graph, so repeated forwards without a backward
    keep no memory). No reference cycle: the node refers to the call, the call not to
    the node. The loss hook finds the edge again by walking the graph
    (:func:`curvlib.engine.loss_columns.demoted_edges`).
    """
    for call in calls:
        edge = call.output_edge
        if edge is None or not call.live:
            continue
        try:
            meta = edge.node.metadata
        except (AttributeError, RuntimeError):  # no node metadata: the old behaviour
            ENGINE.tape.pop(call.uid, None)
            call.release()
            continue
        meta.setdefault(META_KEY, {})[edge.output_nr] = call
        call.output_edge = None
        call.demoted = True


def _root_post_hook(root: nn.Module, inputs, output) -> None:
    if ENGINE.paused:
        return
    if ENGINE.intercepts and ENGINE.intercepts[-1][0] is root and ENGINE.intercepts[-1][1] is ENGINE.op_capture:
        ENGINE.intercepts.pop()[1].__exit__(None, None, None)
        ENGINE.op_capture = None
    if ENGINE.forwards and ENGINE.forwards[-1][0] is root:
        ENGINE.forwards.pop()
        _check_batch1(root)


def _check_batch1(root: nn.Module) -> None:
    """Calls of this forward on a batch of 1 while others ran on ``N > 1`` samples, not re-recorded
    on the batch (:mod:`curvlib.engine.operations`): their output was broadcast over the samples in
    a way curvlib does not follow, so their per-sample quantities would be summed over the samples.
    They raise when a curvature backward reaches them."""
    calls = getattr(root, _CALLS, None)
    if not calls or not calls.batch1 or calls.max_batch <= 1:
        return
    for call in calls.batch1:
        if call.live and call.error is None:
            call.error = (
                f"curvlib: the layer {call.module} ran on a batch of 1 (input shape "
                f"{tuple(call.input.shape)}) in a forward of {type(root).__name__} whose other layers "
                f"ran on {calls.max_batch} samples: its output is broadcast over the samples, so its "
                "per-sample gradients (and every exact or KFAC quantity) would be summed over them. "
                "curvlib follows a batch-1 output that an elementwise operation broadcasts directly "
                "against the batch (inputs_embeds + self.wpe(position_ids)); here it was used "
                "otherwise. Give the layer its input expanded to the batch (e.g. "
                "position_ids.expand(N, -1)) or compute the broadcast directly on its output."
            )


def _outside_capture(fn):
    """Run ``fn`` (the engine's own bookkeeping during a forward) without the operation capture
    seeing its tensor operations (each would cost a ``__torch_function__`` call)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if ENGINE.op_capture is None:
            return fn(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return wrapper


@_outside_capture
def _layer_forward_hook(module: nn.Module, inputs, output):
    if not inputs or not isinstance(inputs[0], Tensor):
        return None
    x = inputs[0]
    L = _merged_rows(module, x, output)
    if L is None:
        record_call(module, x, output)
        return None
    # the rows of x merge positions of each sample (OPT: fc1(hidden.reshape(-1, D))): record the
    # per-sample views and give the caller the same values through them
    yc = per_sample(output, L)
    record_call(module, per_sample(x, L), yc)
    out = restore(yc, L)
    setattr(out, ATTR, L)
    if ENGINE.op_capture is None:  # follow the rows through the rest of the forward
        _push_op_capture(ENGINE.forwards[-1][0], _loose(ENGINE.forwards[-1][0]))
    return out


def _merged_rows(module: nn.Module, x: Tensor, output) -> Optional[Layout]:
    """The layout of a layer input whose samples are not dimension 0 alone (a reshape merged
    positions into it, or moved it), for layers that read extra dimensions as positions
    (``LayerAdapter.positions``); ``None`` otherwise. Known from the operation capture when it ran,
    else from the autograd graph when the input's batch is not the model's."""
    if ENGINE.paused or not ENGINE.forwards or not isinstance(output, Tensor) or not output.requires_grad:
        return None
    adapter = adapter_for(module)
    if not adapter.positions or x.ndim < 1:
        return None
    L = x.__dict__.get(ATTR)
    if L is None:
        calls = getattr(ENGINE.forwards[-1][0], _CALLS, None)
        rb = calls.root_batch if calls is not None else None
        b = adapter.batch_size(module, x)
        if rb is None or b in (rb, 1) or not torch.is_grad_enabled():
            return None
        L = graph_layout(x)
    if L is None or not L.known or is_default(x, L):
        return None
    if output.ndim < x.ndim or L.dim >= output.ndim - 1 or output.shape[: L.dim + 1] != x.shape[: L.dim + 1]:
        return None
    return L


@_outside_capture
def record_call(module, x: Tensor, output) -> Optional[LayerCall]:
    """Record one call of an extended layer (or of a part, see
    :meth:`~curvlib.engine.layers.base.LayerAdapter.intercept` and :mod:`curvlib.engine.operations`):
    input ``x`` and ``output``. Returns the record (``None`` if nothing was recorded)."""
    if ENGINE.paused:
        return None
    if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
        return None
    in_backward = _in_backward()
    if in_backward and ENGINE.in_extra_backward:
        return None  # recomputed by checkpointing inside the engine's own extra backward
    root, root_inputs = ENGINE.forwards[-1] if ENGINE.forwards else (None, None)
    call = LayerCall(
        module=module,
        root=root,
        input=x.detach(),
        output_edge=torch.autograd.graph.get_gradient_edge(output),
        output_shape=output.shape,
        root_inputs=root_inputs,
        in_backward=in_backward,
    )
    # ownership: the extended model owns the calls of its current forward (a layer
    # called outside it owns its latest call); the tape only refers to them weakly, so
    # dropping the model, or its next forward, frees everything
    owner = root if root is not None else module
    calls = getattr(owner, _CALLS, None)
    if root is None or calls is None:
        _demote_all(calls or ())
        calls = CallList()
        setattr(owner, _CALLS, calls)
    calls.append(call)
    ENGINE.tape[call.uid] = call
    # the live calls of this layer (a part of a composite layer, e.g. attention's in_proj, is a
    # new object per call: its calls are kept under the part's stable ``calls_key``); layers that
    # share a parameter (weight tying) keep theirs under their group's key
    note_params(module)
    key = calls_key(module)
    live = ENGINE.calls_of.get(key)
    if live is None:
        live = ENGINE.calls_of[key] = weakref.WeakSet()
    live.add(call)
    call.hook = output.register_hook(functools.partial(_layer_output_hook, weakref.ref(call), module))
    if root is not None and not in_backward:
        _batch_bookkeeping(calls, call, module, x, output)
    return call


def _batch_bookkeeping(calls: CallList, call: LayerCall, module, x: Tensor, output: Tensor) -> None:
    """Note the call's batch size in its forward's list; a call on a batch of its own (1, or not
    the model's) gets its output watched by the operation capture, activated if need be
    (:mod:`curvlib.engine.operations`, broadcast batches)."""
    b = adapter_for(module).batch_size(module, x)
    if b > calls.max_batch:
        calls.max_batch = b
    rb = calls.root_batch
    if b == 1:
        calls.batch1.append(call)
    elif rb is None or b == rb:
        return
    if ENGINE.op_capture is None and not _push_op_capture(call.root, _loose(call.root)):
        return
    output.__dict__[WATCH] = Watch(weakref.ref(call), module, call.input, b, rb)


def _drop_call(call: LayerCall) -> None:
    """Forget a recorded call (its output was re-recorded expanded to the batch)."""
    if call.hook is not None:
        call.hook.remove()
    ENGINE.tape.pop(call.uid, None)
    call.release()


def calls_key(module) -> object:
    """The key of ``module``'s calls, the one place that decides which calls are combined: the
    layer itself, or a part's ``calls_key`` (:class:`~curvlib.engine.layers.attention.Projection`);
    for layers that share a parameter with another layer, their
    :class:`~curvlib.engine.tying.TieGroup` (weight tying). Keys ``ENGINE.calls_of`` (liveness),
    the context's pending captures and the alignment of cotangent columns."""
    return group_key(module)


def _composite_pre_hook(module: nn.Module, args) -> None:
    """A composite layer (``nn.MultiheadAttention``) applies its parameters functionally: its
    adapter's interception records the parts while its forward runs."""
    if ENGINE.paused or not torch.is_grad_enabled():
        return
    cm = adapter_for(module).intercept(module, record_call)
    cm.__enter__()
    ENGINE.intercepts.append((module, cm))


def _composite_post_hook(module: nn.Module, args, output) -> None:
    # always called (also when the forward raised): leave the interception of this forward
    if ENGINE.intercepts and ENGINE.intercepts[-1][0] is module:
        ENGINE.intercepts.pop()[1].__exit__(None, None, None)


def _layer_output_hook(ref: "weakref.ref[LayerCall]", module: nn.Module, grad: Tensor):
    if ENGINE.in_extra_backward:
        return None
    call = ref()
    ctx = ENGINE.active
    if ctx is None:
        if call is not None:
            ENGINE.tape.pop(call.uid, None)
            call.release()
        return None
    if call is not None and call.error is not None and not call.in_backward:
        raise RuntimeError(call.error)
    if call is None or not call.live:
        raise RuntimeError(
            f"curvlib: the backward reached {module}, but the record of that forward "
            "call was already back-propagated (a second backward through the same graph, "
            "e.g. with retain_graph=True) or dropped. Run one backward per forward of the "
            "extended model (several forwards before one backward are fine)."
        )
    if call.in_backward and any(s not in ("grad", "empirical") for s in ctx.sources):
        raise RuntimeError(
            f"curvlib: {module} ran its forward inside the backward pass, as "
            "torch.utils.checkpoint(..., use_reentrant=True) does when it recomputes the "
            "checkpointed segment; the engine back-propagated the 'mc' / 'type-2' "
            "cotangents before that, so they cannot reach this layer. Use "
            "checkpoint(..., use_reentrant=False) (supported for every fisher_type), or "
            "fisher_type='empirical' / BatchGrad, which work with reentrant checkpointing."
        )
    ctx.process_layer(call, grad)
    return None


def _in_backward() -> bool:
    """Whether an autograd backward pass is running on this thread."""
    return torch._C._current_graph_task_id() != -1


def _loss_forward_hook(loss: nn.Module, inputs, output) -> None:
    if ENGINE.paused:
        return
    if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
        return
    holder = [inputs[0], inputs[1] if len(inputs) > 1 else None]
    output.register_hook(functools.partial(_loss_output_hook, loss, holder))


def _loss_output_hook(loss: nn.Module, holder: list, grad: Tensor):
    if ENGINE.in_extra_backward or not holder:
        return None
    f, y = holder
    holder.clear()
    ctx = ENGINE.active
    if ctx is not None:
        ctx.process_loss(loss, f, y, grad)
    return None
