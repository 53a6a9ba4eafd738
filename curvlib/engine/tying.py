r"""Weight tying: one parameter used by several layers (``lm_head.weight = wte.weight``).

**Grouping, on the parameter.** Each recorded call names its layer's parameters
(:func:`note_params`, from ``hooks.record_call``). When a parameter turns up in a second layer (a
module, a part of a composite layer such as attention's ``in_proj``, or the part of an operation
applying it, :mod:`curvlib.engine.operations`), the
two layers join one :class:`TieGroup`, and the group is then their key everywhere the engine
decides which calls belong together (:func:`group_key`, which ``hooks.calls_key`` returns): the
live calls (``ENGINE.calls_of``, ``loss_columns.other_live_calls``), the captures waiting for the
group's other calls (``curvature._pending``), the calls whose cotangent columns are aligned
(``loss_columns.align_calls`` / ``align_pending``) and the calls whose columns are not streamed
(``LossColumns._single_call``). Nothing depends on layer types: a layer is whatever has an
adapter and names its parameters (``weight`` / ``bias`` attributes), so parts plug in alike. A
layer called several times is still one layer of its group (its calls are positions,
:class:`~curvlib.engine.capture.SharedCapture`).

**The quantities.** Once every live call of a group was captured, :func:`split_group` turns the
captures into the units the extensions run on: per layer, its own (untied) parameters
(``lm_head.bias``) as that layer's capture restricted to them; per tied parameter ``p`` one
:class:`TiedCapture` over its uses ``u = 1..U``, each use the capture of one layer restricted
to ``p``. The per-sample gradient of ``p`` is the sum over its uses, each in ``p``'s own shape
(the layer adapters already write every per-sample gradient in its parameter's shape, whatever
the orientation: an ``nn.Embedding`` use of a ``[V, D]`` weight is activation side first, the
``nn.Linear`` use of the same weight cotangent side first):

    X_{k,n} = sum_u X^(u)_{k,n}

so every quantity defined through the per-sample gradients is exact, the cross terms between the
uses included (the diagonal of a tied parameter's GGN is not the sum of its uses' diagonals).
The uses' positions cannot be stacked into one layer as a shared layer's calls are (their
activation and cotangent sides differ in size and side), so a :class:`TiedCapture` has no
``act()`` / ``cot()``: extensions read its per-sample gradients (its ``structure`` is
``"tied"``, :attr:`~curvlib.engine.factors.BlockStructure.factored` ``False``), its uses
(``capture.uses``: KFAC's one Kronecker term per use, GGN products as sums over the uses), or,
for a parameter that every use sums over positions (a tied bias), the uses' vectors stacked as
positions (``sum_cot``).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import factors
from curvlib.engine.capture import LayerCapture, SharedCapture, Source, finite_or_raise
from curvlib.engine.state import ENGINE


class TieGroup:
    """The key of the layers that share parameters (a weak-referenceable token).

    Attributes:
        members: the layer keys (:func:`layer_key`) of the group (weak).
    """

    def __init__(self) -> None:
        self.members: "weakref.WeakSet[object]" = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"TieGroup({len(self.members)} layers)"


def layer_key(module: Any) -> object:
    """A layer's own key: the module, or a part's stable ``calls_key``
    (:class:`~curvlib.engine.layers.attention.Projection`)."""
    return module if isinstance(module, nn.Module) else module.calls_key


def group_key(module: Any) -> object:
    """The key of ``module``'s calls in the engine: its :class:`TieGroup` when one of its
    parameters is used by another layer, else :func:`layer_key`."""
    key = layer_key(module)
    group = ENGINE.tie_groups.get(key)
    return key if group is None else group


def layer_params(module: Any) -> Tuple[Tensor, ...]:
    """The parameters a layer (or part) applies itself: ``parameters(recurse=False)``."""
    if isinstance(module, nn.Module):
        return tuple(p for p in module._parameters.values() if p is not None)
    return tuple(module.parameters())


def note_params(module: Any) -> None:
    """Record which layer uses which parameter; join two layers that use one parameter into a
    :class:`TieGroup` (moving the live calls recorded under their keys to the group's). One
    dictionary lookup per call when the layer's parameters did not change."""
    key = layer_key(module)
    params = layer_params(module)
    seen = ENGINE.layer_params.get(key)
    if seen is not None and len(seen) == len(params) and all(a is b for a, b in zip(seen, params)):
        return
    ENGINE.layer_params[key] = params
    for p in params:
        ref = ENGINE.param_layer.get(p)
        other = ref() if ref is not None else None
        if other is None:
            ENGINE.param_layer[p] = weakref.ref(key)
        elif other is not key:
            _join(key, other)


def _join(a: object, b: object) -> None:
    """Put the layers ``a`` and ``b`` (and their groups' members) into one group."""
    ga, gb = ENGINE.tie_groups.get(a), ENGINE.tie_groups.get(b)
    if ga is not None and ga is gb:
        return
    group = ga or gb or TieGroup()
    for layer in (a, b):
        old = ENGINE.tie_groups.get(layer)
        if old is group:
            continue
        members = list(old.members) if old is not None else [layer]
        for m in members:
            ENGINE.tie_groups[m] = group
            group.members.add(m)
            _move_calls(m, group)
        if old is not None:
            _move_calls(old, group)


def _move_calls(src: object, dst: object) -> None:
    """The live calls recorded under ``src`` now count under ``dst`` (``ENGINE.calls_of``)."""
    calls = ENGINE.calls_of.pop(src, None)
    if calls:
        live = ENGINE.calls_of.get(dst)
        if live is None:
            live = ENGINE.calls_of[dst] = weakref.WeakSet()
        live |= calls


# --------------------------------------------------------------------------- the tied unit


class TiedLayer:
    """Layer-like stand-in for one parameter used by several layers: what ``capture.module`` is
    for a :class:`TiedCapture` (error messages name it; extensions key their per-layer state by
    it). Equal for the same parameter, so state joins over the backwards of one context.

    Attributes:
        name: the parameter's attribute name here (``"weight"`` or ``"bias"``: that of its first
            use), also set as an attribute holding the parameter; ``param``: the parameter;
        layers: the layers of its uses (modules or parts), in forward order; ``root``: the
            extended model (for the names in :meth:`__repr__`), or ``None``.
    """

    def __init__(self, name: str, param: nn.Parameter, layers: Sequence[Any], root: Optional[nn.Module]):
        self.name, self.param, self.layers, self.root = name, param, list(layers), root
        setattr(self, name, param)

    def parameters(self, recurse: bool = True):
        return iter([self.param])

    def __eq__(self, other) -> bool:
        return isinstance(other, TiedLayer) and other.param is self.param

    def __hash__(self) -> int:
        return hash(("tied", id(self.param)))

    def __repr__(self) -> str:
        names = _qualified(self.root, self.param, self.layers)
        if names is None:
            uses = ", ".join(repr(m) for m in self.layers)
            return f"the tied parameter of shape {tuple(self.param.shape)} (used by {uses})"
        pnames, lnames = names
        uses = ", ".join(f"{type(_owner(m)).__name__} '{n}'" for m, n in zip(self.layers, lnames))
        return f"the tied parameter {' = '.join(pnames)} (used by {uses})"


def _owner(layer: Any) -> Any:
    """The module a layer's parameters belong to (a part's ``owner``; a module itself)."""
    return layer if isinstance(layer, nn.Module) else getattr(layer, "owner", layer)


def _qualified(root: Optional[nn.Module], p: Tensor, layers: Sequence[Any]) -> Optional[Tuple[List[str], List[str]]]:
    """The names of ``p`` in ``root`` and of the ``layers`` (a part: ``owner.part``), or ``None``."""
    if root is None:
        return None
    pnames = [n for n, q in root.named_parameters(remove_duplicate=False) if q is p]
    mods = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    lnames = []
    for m in layers:
        owner = _owner(m)
        name = mods.get(id(owner), type(owner).__name__) or "(root)"
        lnames.append(name if owner is m else f"{name}.{getattr(m, 'name', type(m).__name__)}")
    return (pnames or [f"[{tuple(p.shape)}]"]), lnames


class TiedCapture(LayerCapture):
    """One parameter's uses by several layers in one backward, as one capture (module docstring).

    Attributes:
        module: the :class:`TiedLayer`; ``uses``: ``[(capture, name), ...]``, the capture of each
            layer using the parameter (single or shared calls, restricted to the parameter) and
            the parameter's name there, in forward order.
    """

    def __init__(self, layer: TiedLayer, uses: List[Tuple[LayerCapture, str]]):
        uses = sorted(uses, key=lambda u: u[0].order)
        first = uses[0][0]
        self.module, self.adapter, self.uses = layer, None, uses
        self.x = self.raw = self.lazy = None
        self.reduced = {}
        self.empirical_scale = first.empirical_scale
        self.root, self.root_inputs = first.root, first.root_inputs
        self.loss_calls = max((u.loss_calls for u, _ in uses), key=len)
        self.order, self.backward = first.order, first.backward
        seen: Dict[int, Tuple[Optional[nn.Module], Any]] = {}
        for u, _ in uses:
            for r, inputs in getattr(u, "forwards", [(u.root, u.root_inputs)]):
                if inputs is not None:
                    seen.setdefault(id(inputs), (r, inputs))
        self.forwards: List[Tuple[Optional[nn.Module], Any]] = list(seen.values())
        self._act = None
        self._cot: Dict[Source, Tensor] = {}
        self._bias_cot: Dict[Any, Tensor] = {}

    # ------------------------------------------------------------------ description
    @property
    def params(self) -> Dict[str, nn.Parameter]:
        p = self.module.param
        return {self.module.name: p} if p.requires_grad else {}

    @property
    def calls(self) -> List[LayerCapture]:
        return [c for u, _ in self.uses for c in u.calls]

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        sizes = [u.batch_size for u, _ in self.uses]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"curvlib: {self.module} has uses on batches of sizes {sizes} in one backward; its "
                "per-sample gradient sums the uses' gradients of sample n, so the uses must share the "
                "batch dimension (sample n of every use is the same sample)."
            )
        return sizes[0]

    def summed(self, name: str) -> bool:
        """Whether every use sums the parameter over positions (a tied bias)."""
        return all(u.summed(n) for u, n in self.uses)

    @property
    def has_summed_params(self) -> bool:
        return False

    def has(self, source: Source) -> bool:
        return all(u.has(source) for u, _ in self.uses)

    @property
    def float_input(self) -> bool:
        return all(u.float_input for u, _ in self.uses)

    def structure(self, name: str = "weight") -> factors.BlockStructure:
        """``"summed"`` when every use sums over positions, else ``"tied"`` (no single
        orientation: per-sample gradients, or the uses one by one)."""
        if self.summed(name):
            return factors.BlockStructure("summed", 1)
        return factors.BlockStructure("tied", 1)

    @property
    def orientation(self) -> factors.Orientation:
        raise self._no_vectors("one orientation")

    def _no_vectors(self, what: str) -> Exception:
        return NotImplementedError(
            f"curvlib: {self.module} has no {what}: its uses by {len(self.uses)} layers differ in the "
            "sides and sizes of their per-position vectors. An extension reads a tied parameter "
            "through its per-sample gradients (capture.per_sample_grads, the sum over the uses) or "
            "its uses one by one (capture.uses); please report the extension that got here."
        )

    # ------------------------------------------------------------------ vectors
    def act(self) -> Tensor:
        raise self._no_vectors("activation-side vectors")

    def cot(self, source: Source) -> Tensor:
        raise self._no_vectors("cotangent-side vectors")

    def act_factor(self, kfac_approx: str) -> Optional[Tensor]:
        raise self._no_vectors("activation factor")

    def act_rows(self) -> int:
        raise self._no_vectors("activation rows")

    def sum_cot(self, name: str, source: Source) -> Tensor:
        """Every use sums the parameter over positions: the uses' vectors stacked as positions
        ``[K, N, sum_u T_u, numel]``, whose sum over positions is the tied per-sample gradient."""
        if not self.summed(name):
            raise self._no_vectors("summed cotangents")
        key = (name, source)
        if key not in self._bias_cot:
            parts = [u.sum_cot(n, source) for u, n in self.uses]
            parts = [v.reshape(*v.shape[:3], -1) for v in parts]
            self._same_columns([v.shape for v in parts], source)
            self._bias_cot[key] = torch.cat(parts, dim=2)
        return self._bias_cot[key]

    def bias_cot(self, source: Source) -> Tensor:
        return self.sum_cot(self.module.name, source)

    def _same_columns(self, shapes: List[torch.Size], source: Source) -> None:
        if len({tuple(s[:2]) for s in shapes}) > 1:
            raise RuntimeError(
                f"curvlib: the uses of {self.module} got {source!r} cotangents with different "
                f"(columns, samples) {[tuple(s[:2]) for s in shapes]}; their per-sample gradients "
                "cannot be added. Please report this with the model."
            )

    # ------------------------------------------------------------------ per-sample gradients
    def per_sample_grads_into(self, name: str, source: Source, out: Optional[Tensor] = None) -> Tensor:
        """``sum_u X^(u)`` ``[K N, *p.shape]``: each use's per-sample gradients (in the
        parameter's shape) added up, written into ``out`` if given."""
        self.batch_size  # noqa: B018  (raises for uses on different batches)
        (u0, n0), *rest = self.uses
        out = u0.per_sample_grads_into(n0, source, out)
        tmp = None
        for u, n in rest:
            tmp = u.per_sample_grads_into(n, source, tmp)
            self._same_columns([out.shape, tmp.shape], source)
            out.add_(tmp)
        return out

    def finite_inputs(self, name: str, source: Source) -> Tuple[int, int]:
        """Every use's :meth:`LayerCapture.finite_inputs`; the common ``(K, N)``."""
        kn = [u.finite_inputs(n, source) for u, n in self.uses]
        self._same_columns([torch.Size(s) for s in kn], source)
        return kn[0]

    def select(self, index: Tensor, scale: float = 1.0) -> "TiedCapture":
        return TiedCapture(self.module, [(u.select(index, scale), n) for u, n in self.uses])


def split_group(captures: List[LayerCapture]) -> List[LayerCapture]:
    """The units the extensions run on for the captured calls of one :class:`TieGroup` (module
    docstring): per layer its untied parameters, per tied parameter a :class:`TiedCapture`; in
    forward order."""
    by_layer: Dict[object, List[LayerCapture]] = {}
    for c in sorted(captures, key=lambda c: c.order):
        by_layer.setdefault(layer_key(c.module), []).append(c)
    layers = [cs[0] if len(cs) == 1 else SharedCapture(cs) for cs in by_layer.values()]
    users: Dict[int, List[Tuple[LayerCapture, str]]] = {}
    params: Dict[int, nn.Parameter] = {}
    for lc in layers:
        for name, p in lc.params.items():
            users.setdefault(id(p), []).append((lc, name))
            params[id(p)] = p
    units: List[LayerCapture] = []
    for lc in layers:
        own = [name for name, p in lc.params.items() if len(users[id(p)]) == 1]
        if len(own) == len(lc.params):
            units.append(lc)
        elif own:
            units.append(lc.restricted(own))
    for pid, uses in users.items():
        if len(uses) > 1:
            layer = TiedLayer(uses[0][1], params[pid], [lc.module for lc, _ in uses], uses[0][0].root)
            units.append(TiedCapture(layer, [(lc.restricted([n]), n) for lc, n in uses]))
    return sorted(units, key=lambda u: u.order)


__all__ = [
    "TieGroup", "TiedLayer", "TiedCapture", "layer_key", "group_key", "layer_params", "note_params", "split_group",
]
