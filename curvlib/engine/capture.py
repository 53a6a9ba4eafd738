"""What extensions see: the captures of one layer call during one backward.

Curvature *sources* (keys of :attr:`LayerCapture.cotangents`):

- ``"grad"``: the actual output gradient of the backward (``K = 1``);
- ``"empirical"``: ``"grad"`` times ``sqrt(N')`` (the loss's mean normalization), so that
  ``sum_n s_n s_n^T`` is the empirical Fisher ``(1/N') sum_n grad l_n grad l_n^T``;
- ``("mc", M)``: gradients of ``M`` targets sampled from the model (scaled, see
  :mod:`curvlib.engine.losses`);
- ``"type-2"``: the back-propagated loss-Hessian square root, columns shared over output
  positions (curvlinops' KFAC convention);
- ``"type-2-exact"``: one column per (class, output position): the exact GGN factor.

For every source, ``sum_k sum_n X_{k,n} X_{k,n}^T`` over per-sample gradients
``X_{k,n}`` of a parameter is its curvature block (exactly for ``"type-2-exact"`` and
``"empirical"``, in expectation for ``"mc"``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import factors
from curvlib.engine.layers.base import LayerAdapter
from curvlib.engine.lazy_columns import LazyColumns
from curvlib.engine.records import LossCall, Objective

Source = Hashable


def source_key(fisher_type: str, mc_samples: int = 1, exact: bool = False) -> Source:
    """The capture source for a curvlinops-style ``fisher_type``."""
    if fisher_type == "empirical":
        return "empirical"
    if fisher_type == "mc":
        return ("mc", int(mc_samples))
    if fisher_type == "type-2":
        return "type-2-exact" if exact else "type-2"
    raise ValueError(
        f"curvlib: unknown fisher_type {fisher_type!r}; use 'type-2', 'mc' or 'empirical'."
    )


class LayerCapture:
    """Inputs and output cotangents of one layer call, with lazy per-sample matrices.

    Attributes:
        module: the layer; ``adapter`` its :class:`LayerAdapter`.
        x: the layer input; ``batch_size`` its ``N``.
        raw: ``source -> [K, *output.shape]`` cotangents w.r.t. the layer output.
        empirical_scale: ``sqrt(N')`` for the ``"empirical"`` source.
        root: the extended model whose forward made this call (``None`` if none);
            ``root_inputs`` the ``(args, kwargs)`` of that forward (tensors detached).
        loss_calls: the extended losses this context's backwards reached so far.
        order: increases with the forward order of layer calls.
        backward: index of the ``backward`` call within the ``curvature`` context
            (0, 1, ... for gradient accumulation over micro-batches).
        reduced: column reductions summed by the engine (:meth:`reduction`).
        lazy: the matrix-free columns of the sources the engine did not store
            (:meth:`lazy_columns`), or ``None``.
    """

    def __init__(
        self,
        module: nn.Module,
        adapter: LayerAdapter,
        x: Tensor,
        raw: Dict[Source, Tensor],
        empirical_scale: float,
        root: Optional[nn.Module] = None,
        root_inputs: Optional[Tuple[tuple, Dict[str, Any]]] = None,
        loss_calls: Optional[List[LossCall]] = None,
        order: int = 0,
        backward: int = 0,
        reduced: Optional[Dict[Any, Dict[str, Tensor]]] = None,
        lazy: Optional["LazyColumns"] = None,
    ):
        if x.numel() == 0:
            raise ValueError(
                f"curvlib: {module} got an empty input (shape {tuple(x.shape)}); curvature "
                "of an empty batch is undefined. Skip empty batches."
            )
        x, raw = in_param_dtype(module, x, raw)
        self.module = module
        self.adapter = adapter
        self.x = x
        self.raw = raw
        self.batch_size = adapter.batch_size(module, x)
        self.empirical_scale = empirical_scale
        self.root = root
        self.root_inputs = root_inputs
        self.loss_calls = loss_calls or []
        self.order = order
        self.backward = backward
        self.reduced = dict(reduced or {})
        self.lazy = lazy
        self._act: Optional[Tensor] = None
        self._cot: Dict[Source, Tensor] = {}
        self._bias_cot: Dict[Source, Tensor] = {}

    #: the parameter names :attr:`params` is restricted to (:meth:`restricted`), ``None``: all
    _only: Optional[frozenset] = None
    #: a tied parameter's uses ``[(capture, name), ...]`` (:class:`~curvlib.engine.tying.TiedCapture`),
    #: ``None`` for the captures of one layer
    uses: Optional[List[Tuple["LayerCapture", str]]] = None

    def restricted(self, names) -> "LayerCapture":
        """This capture with :attr:`params` restricted to ``names`` (a shallow copy sharing the
        cached vectors): a layer whose other parameters are tied to other layers gets its own
        parameters' quantities from it (:mod:`curvlib.engine.tying`)."""
        out = copy.copy(self)
        out._only = frozenset(names)
        return out

    @property
    def act_side(self) -> str:
        return self.adapter.act_side

    @property
    def orientation(self) -> "factors.Orientation":
        """The weight's :class:`~curvlib.engine.factors.Orientation` (which side ``a`` is on)."""
        return factors.orientation(self.adapter.act_side)

    @property
    def params(self) -> Dict[str, nn.Parameter]:
        """``"weight"`` / ``"bias"`` parameters that require gradients."""
        out = {}
        for name in ("weight", "bias"):
            if self._only is not None and name not in self._only:
                continue
            p = getattr(self.module, name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out[name] = p
        return out

    def summed(self, name: str) -> bool:
        """Whether parameter ``name`` has per-sample gradients ``sum_t s'_{n,t}`` (a bias, or
        an elementwise scale of a norm layer) rather than ``sum_t s a^T``."""
        return name == "bias" or name in self.adapter.summed_params

    def has(self, source: Source) -> bool:
        return source == "empirical" and "grad" in self.raw or source in self.raw or self.lazy_columns(source) is not None

    def lazy_columns(self, source: Source) -> Optional["LazyColumns"]:
        """The columns of ``source`` as products (:class:`~curvlib.engine.lazy_columns.LazyColumns`),
        where the engine did not store them (only for extensions with ``lazy_columns = True``);
        :meth:`cot` and the other accessors still work and form the columns then."""
        if self.lazy is not None and source in self.lazy.V and source not in self.raw:
            return self.lazy
        return None

    def _raw(self, source: Source) -> Tensor:
        if source == "empirical":
            return self.raw["grad"] * self.empirical_scale
        if self.lazy_columns(source) is not None:  # formed on first use (K VJPs)
            self.raw[source] = self.lazy.columns(source)
        try:
            return self.raw[source]
        except KeyError:
            raise RuntimeError(
                f"curvlib: no {source!r} cotangents reached {self.module}. For "
                "fisher_type 'mc' and 'type-2' the loss must be extended: "
                "loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss()) (or MSELoss, "
                "BCEWithLogitsLoss, NLLLoss), and the model output must feed it."
            ) from None

    def reduction(self, ext: Any, source: Source) -> Optional[Dict[str, Tensor]]:
        """The sums of ``ext.column_reduction(source)`` over all columns of ``source`` that
        reached this call, or ``None`` if the engine did not reduce ``source`` for ``ext``
        (then :meth:`cot` has the columns) or no column reached the call. Single calls only
        (a :class:`SharedCapture` has one per call: use :attr:`calls`)."""
        return self.reduced.get((id(ext), source))

    @property
    def calls(self) -> List["LayerCapture"]:
        """The captures of the single calls this capture combines (``[self]`` for one call;
        see :class:`SharedCapture`)."""
        return [self]

    @property
    def float_input(self) -> bool:
        """Whether the layer input is floating point (not token indices)."""
        return self.x.is_floating_point()

    def structured_weight(self, s: Tensor, out: Tensor) -> Optional[Tensor]:
        """Per-sample weight gradients from ``s`` ``[K, N, T, D_s]`` written to ``out`` by the
        adapter's structured rule (Embedding: a scatter; grouped conv: per group), or
        ``None`` for the generic ``sum_t s a^T``."""
        return self.adapter.per_sample_weight(self.module, s, self.x, out)

    def select(self, index: Tensor, scale: float = 1.0) -> "LayerCapture":
        """The capture restricted to the samples ``index``, cotangents times ``scale``."""
        for source in list(self.lazy.V) if self.lazy is not None else []:
            self._raw(source)
        raw = {k: v.index_select(1, index) * scale for k, v in self.raw.items()}
        out = LayerCapture(
            self.module, self.adapter, self.x.index_select(0, index), raw, self.empirical_scale,
            root=self.root, root_inputs=self.root_inputs, loss_calls=self.loss_calls,
            order=self.order, backward=self.backward,
        )
        out._only = self._only
        return out

    def act(self) -> Tensor:
        """Activation-side vectors ``[N, T, D_a]``."""
        if self._act is None:
            self._act = self.adapter.activations(self.module, self.x)
        return self._act

    def act_rows(self) -> int:
        """``N T``: the rows of :meth:`act` (without forming it where the adapter knows)."""
        n = self.adapter.act_count(self.module, self.x)
        return self.act().shape[:-1].numel() if n is None else n

    def act_factor(self, kfac_approx: str) -> Optional[Tensor]:
        """The adapter's structured KFAC activation factor (e.g. 1-D), or ``None``."""
        return self.adapter.act_factor(self.module, self.x, kfac_approx)

    def act_gram(self, scale: float = 1.0) -> Tensor:
        """``scale * sum_{n,t} a a^T`` ``[D_a, D_a]`` of :meth:`act` (the adapter's own kernel where
        it has one, e.g. convolutions; else :func:`~curvlib.engine.factors.gram_rows`)."""
        G = self.adapter.act_gram(self.module, self.x, self.act)
        if G is None:
            return factors.gram_rows(self.act(), scale)
        return G if scale == 1.0 else G.mul_(scale)

    def act_factor_rows(self, kfac_approx: str) -> Optional[Tensor]:
        """Rows per block of :meth:`act_factor` when they differ between blocks, else ``None``."""
        return self.adapter.act_factor_rows(self.module, self.x, kfac_approx)

    def cot(self, source: Source) -> Tensor:
        """Weight cotangent-side vectors ``[K, N, T, D_s]`` of ``source``."""
        if source not in self._cot:
            self._cot[source] = self.adapter.weight_cotangents(
                self.module, self._raw(source), self.x
            )
        return self._cot[source]

    def bias_cot(self, source: Source) -> Tensor:
        """Bias cotangent vectors ``[K, N, T', D_out]`` of ``source``."""
        if type(self.adapter).bias_cotangents is LayerAdapter.bias_cotangents:
            return self.cot(source)
        if source not in self._bias_cot:
            self._bias_cot[source] = self.adapter.bias_cotangents(
                self.module, self._raw(source), self.x
            )
        return self._bias_cot[source]

    def sum_cot(self, name: str, source: Source) -> Tensor:
        """Cotangent vectors ``[K, N, T', *]`` of a summed parameter (:meth:`summed`): its
        per-sample gradient is their sum over ``T'``."""
        if name == "bias":
            return self.bias_cot(source)
        key = (name, source)
        if key not in self._bias_cot:
            self._bias_cot[key] = self.adapter.param_cotangents(self.module, name, self._raw(source), self.x)
        return self._bias_cot[key]

    def objective(self, who: str = "HMP") -> Objective:
        """The objective of this backward as one record (root model, its inputs, the loss).

        Raises (naming ``who``, the extension that needs it) if the layer was not called inside
        an extended model's forward, or the backward reached no extended loss. With several
        extended losses (a GAN's two terms) the record holds the first; :attr:`loss_calls` has
        them all.
        """
        if self.root is None or self.root_inputs is None:
            raise RuntimeError(
                f"curvlib: {who} needs {self.module} to be called inside the forward of an extended "
                "model: model = curvlib.extend(model); loss_fn(model(x), y).backward()."
            )
        if not self.loss_calls:
            raise RuntimeError(
                f"curvlib: {who} needs the extended loss that {self.module} feeds: "
                "loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss()) (or MSELoss, ...)."
            )
        return Objective(self.root, self.root_inputs, self.loss_calls[0])

    # ------------------------------------------------------------ the factorisation applied
    def per_sample_grads(self, name: str, source: Source) -> Tensor:
        """Per-sample gradients ``[K, N, *p.shape]`` of parameter ``name``.

        ``X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T`` (or its transpose for left-side
        layers), ``sum_t s'_{k,n,t}`` for the bias.
        """
        X = self.per_sample_grads_into(name, source)
        return X.view(-1, self.batch_size, *X.shape[1:])

    def per_sample_grads_into(self, name: str, source: Source, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients ``[K * N, *p.shape]`` of parameter ``name`` for ``source``
        (rows ``k * N + n``), written into ``out`` if given (contiguous, that shape) and returned.

        Summed parameters: ``sum_t s'``; weights: the adapter's structured product if it has one
        (Embedding: a scatter of ``s``; grouped convolutions: one einsum per group), else
        :func:`~curvlib.engine.factors.outer_sum` of :meth:`cot` and :meth:`act`.
        """
        p = self.params[name]
        if self.summed(name):
            sb = self.sum_cot(name, source)
            shape = (sb.shape[0] * sb.shape[1], *p.shape)
            if out is None:
                out = sb.new_empty(shape)
            torch.sum(sb, dim=2, out=out.view(sb.shape[0], sb.shape[1], -1))
            return out
        s = self.cot(source)
        shape = (s.shape[0] * s.shape[1], *p.shape)
        if out is None:
            out = s.new_empty(shape)
        if self.structured_weight(s, out) is not None:
            return out  # structured activations (Embedding: a scatter of s)
        return factors.outer_sum(s, self.act(), self.orientation, out)

    def finite_inputs(self, name: str, source: Source) -> Tuple[int, int]:
        """Raise ``FloatingPointError`` at a NaN / Inf in what the per-sample gradients of parameter
        ``name`` are built from (the ``source`` cotangent vectors and, for a weight, the layer
        input): a check of the inputs instead of the (larger) result. Returns ``(K, N)``."""
        v = self.sum_cot(name, source) if self.summed(name) else self.cot(source)
        what = "the output gradient" if source == "grad" else f"the {source!r} cotangents"
        finite_or_raise(v, self.module, f"{what} ({name})")
        if not self.summed(name) and self.float_input:
            finite_or_raise(self.act(), self.module, "the layer input")
        return v.shape[0], v.shape[1]

    def kfac_act_factor(self, kfac_approx: str = "expand", blocks: int = 1, diagonal: bool = False) -> Tensor:
        """KFAC's ``A`` of the weight: the adapter's structured factor (Embedding: 1-D) if it has
        one, else :func:`~curvlib.engine.factors.kfac_act_factor` of :meth:`act`; expand with one
        block takes :meth:`act_gram` (the adapter's own Gram kernel, convolutions) over ``N T``.
        ``diagonal``: only the diagonal, 1-D (a side above ``max_factor_dim``)."""
        A = self.act_factor(kfac_approx)
        if A is not None:
            return A.diagonal(dim1=-2, dim2=-1).clone() if diagonal and A.dim() > 1 else A
        if diagonal:
            return factors.kfac_act_factor(self.act(), kfac_approx, blocks, diagonal=True)
        if kfac_approx == "expand" and blocks == 1:
            return self.act_gram(1.0 / self.act_rows())
        return factors.kfac_act_factor(self.act(), kfac_approx, blocks)

    def kfac_weight_factors(self, source: Source, kfac_approx: str = "expand") -> Tuple[Tensor, Tensor]:
        """``(G, A)`` of the layer's (Kronecker-factored) weight, in the form of its
        :meth:`structure`: ``[D_s, D_s], [D_a, D_a]``; ``A`` 1-D for a diagonal activation factor
        (Embedding); ``[B, ., .]`` each for the block form. Put them in the parameter's factor order
        with ``capture.orientation.pair(G, A)``."""
        B = self.adapter.blocks(self.module)
        G = factors.kfac_cot_factor(self.cot(source), kfac_approx, B)
        return G, self.kfac_act_factor(kfac_approx, B)

    def kfac_summed_factor(self, name: str, source: Source, diagonal: bool = False) -> Tensor:
        """The exact block ``sum_{k,n} x x^T`` of a summed parameter (``x = sum_t s'``; KFAC's ``[G]``
        of a norm layer's parameters); ``diagonal``: its diagonal, 1-D."""
        x = self.sum_cot(name, source).sum(2)
        return factors.diag_rows(x) if diagonal else factors.gram_rows(x)

    def structure(self, name: str = "weight") -> factors.BlockStructure:
        """The :class:`~curvlib.engine.factors.BlockStructure` of parameter ``name``."""
        if self.summed(name):  # a bias may be in the block form too (attention's in_proj_bias)
            B = self.adapter.bias_blocks(self.module) if name == "bias" else 1
            return factors.BlockStructure("summed", B)
        orient = self.orientation
        B = self.adapter.blocks(self.module)
        if B > 1:
            return factors.BlockStructure("blocks", B, orient, self.adapter.grouped(self.module))
        if type(self.adapter).act_factor is not LayerAdapter.act_factor:
            return factors.BlockStructure("diagonal", 1, orient)
        return factors.BlockStructure("kronecker", 1, orient)

    @property
    def has_summed_params(self) -> bool:
        """Whether the layer has parameters besides a bias without an activation side (norm layers)."""
        return bool(self.adapter.summed_params)


class SharedCapture(LayerCapture):
    """All calls of one layer that one backward reached, as one capture (docs/design.md §2).

    A layer called ``C`` times before one backward (shared weights, an unrolled recurrence,
    a GAN's discriminator on real and on fake data) has the per-sample gradient

        X_{k,n} = sum_c sum_t s^c_{k,n,t} (a^c_{n,t})^T

    of sample ``n``: the calls are *positions*. This capture concatenates the calls' vectors
    along the position axis (``act()`` ``[N, sum_c T_c, D_a]``, ``cot()`` ``[K, N, sum_c T_c,
    D_s]``, likewise the bias and summed-parameter vectors), so every exact extension, written
    against one call's factorisation, is exact for the shared layer with no change, and KFAC
    "expand" gets the factors of one call on the inputs stacked along a position dimension.
    Sample ``n`` of every call must be the same sample (the calls share the batch dimension);
    calls with different batch sizes make the concatenated quantities raise (KFAC, a sum
    over rows, works from :attr:`calls` without them).

    The cotangent columns ``k`` of the calls are aligned by the engine: a column of a loss that
    does not reach a call is zero there (``loss_columns.align_calls``), so a GAN's two losses
    give ``K_real + K_fake`` columns on both calls.

    Attributes:
        calls: the single-call captures in forward order; ``forwards``: the distinct
            ``(root, root_inputs)`` of the model forwards that made them.
    """

    def __init__(self, captures: List[LayerCapture]):
        captures = sorted(captures, key=lambda c: c.order)
        first = captures[0]
        self.module, self.adapter = first.module, first.adapter
        self._calls = captures
        self.x = None
        self.raw = None
        self.reduced = {}
        self.lazy = None
        self.empirical_scale = first.empirical_scale
        self.root, self.root_inputs = first.root, first.root_inputs
        self.loss_calls = max((c.loss_calls for c in captures), key=len)
        self.order, self.backward = first.order, first.backward
        seen: Dict[int, Tuple[Optional[nn.Module], Any]] = {}
        for c in captures:
            if c.root_inputs is not None:
                seen.setdefault(id(c.root_inputs), (c.root, c.root_inputs))
        self.forwards: List[Tuple[Optional[nn.Module], Any]] = list(seen.values())
        self._sizes = [c.batch_size for c in captures]
        self._act = None
        self._cot = {}
        self._bias_cot = {}
        self._t_sizes: Optional[List[int]] = None

    @property
    def calls(self) -> List[LayerCapture]:
        return self._calls

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        self._same_batch("the per-sample quantities")
        return self._sizes[0]

    def _same_batch(self, what: str) -> None:
        if len(set(self._sizes)) > 1:
            raise ValueError(
                f"curvlib: {self.module} was called {len(self._sizes)} times before one backward "
                f"on batches of sizes {self._sizes}; {what} need the calls to share the batch "
                "dimension (sample n of every call is the same sample, whose per-sample gradient "
                "sums over the calls). Call the layer on batches of one size (e.g. concatenate "
                "the batches into one call), or use KFAC, which treats the calls' rows as extra "
                "positions and accepts different batch sizes."
            )

    def _cat(self, parts: List[Tensor], dim: int, what: str) -> Tensor:
        self._same_batch(what)
        shapes = {tuple(p.shape[:dim]) + tuple(p.shape[dim + 1 :]) for p in parts}
        if len(shapes) > 1:
            raise RuntimeError(
                f"curvlib: the {len(parts)} calls of {self.module} in one backward got {what} "
                f"of shapes {[tuple(p.shape) for p in parts]}, which do not stack along the "
                "position axis (different numbers of cotangent columns: the calls were reached "
                "by different extended losses in a way curvlib could not align). Please report "
                "this with the model."
            )
        return torch.cat(parts, dim=dim)

    def has(self, source: Source) -> bool:
        return all(c.has(source) for c in self._calls)

    @property
    def float_input(self) -> bool:
        return all(c.float_input for c in self._calls)

    def act(self) -> Tensor:
        if self._act is None:
            self._act = self._cat([c.act() for c in self._calls], 1, "the layer inputs")
        return self._act

    def act_rows(self) -> int:
        return sum(c.act_rows() for c in self._calls)

    def act_gram(self, scale: float = 1.0) -> Tensor:
        return factors.gram_rows(self.act(), scale)

    def act_factor(self, kfac_approx: str) -> Optional[Tensor]:
        return None  # KFAC combines the calls' own factors (see :attr:`calls`)

    def cot(self, source: Source) -> Tensor:
        if source not in self._cot:
            parts = [c.cot(source) for c in self._calls]
            self._t_sizes = [p.shape[2] for p in parts]
            self._cot[source] = self._cat(parts, 2, f"{source!r} output cotangents")
        return self._cot[source]

    def bias_cot(self, source: Source) -> Tensor:
        if type(self.adapter).bias_cotangents is LayerAdapter.bias_cotangents:
            return self.cot(source)
        if source not in self._bias_cot:
            parts = [c.bias_cot(source) for c in self._calls]
            self._bias_cot[source] = self._cat(parts, 2, f"{source!r} bias cotangents")
        return self._bias_cot[source]

    def sum_cot(self, name: str, source: Source) -> Tensor:
        if name == "bias":
            return self.bias_cot(source)
        key = (name, source)
        if key not in self._bias_cot:
            parts = [c.sum_cot(name, source) for c in self._calls]
            self._bias_cot[key] = self._cat(parts, 2, f"{source!r} cotangents of the {name}")
        return self._bias_cot[key]

    def structured_weight(self, s: Tensor, out: Tensor) -> Optional[Tensor]:
        """The calls' structured per-sample gradients summed (one adapter call per call of
        the layer: the structured rules need each call's own input)."""
        if self._t_sizes is None or sum(self._t_sizes) != s.shape[2]:
            self._t_sizes = [c.cot(next(iter(c.raw))).shape[2] for c in self._calls]
        parts = s.split(self._t_sizes, dim=2)
        if self._calls[0].structured_weight(parts[0].contiguous(), out) is None:
            return None
        tmp = torch.empty_like(out)
        for c, part in zip(self._calls[1:], parts[1:]):
            c.structured_weight(part.contiguous(), tmp)
            out.add_(tmp)
        return out

    def select(self, index: Tensor, scale: float = 1.0) -> "SharedCapture":
        out = SharedCapture([c.select(index, scale) for c in self._calls])
        out._only = self._only
        return out


def in_param_dtype(
    module: nn.Module, x: Tensor, raw: Dict[Source, Tensor]
) -> Tuple[Tensor, Dict[Source, Tensor]]:
    """The layer input and cotangents in the dtype of the layer's parameters.

    Under ``torch.autocast`` a layer computes in a lower precision (its output, hence
    every cotangent, is e.g. bfloat16, while its input may still be float32); all
    quantities are then accumulated and returned in the parameters' dtype, as ``p.grad``
    is.
    """
    dt = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    if dt is None:
        return x, raw
    if x.is_floating_point() and x.dtype != dt:
        x = x.to(dt)
    return x, {k: v if v.dtype == dt else v.to(dt) for k, v in raw.items()}


def finite_or_raise(value, module: nn.Module, what: str) -> None:
    """Raise if a (nested list of) tensor(s) holds NaN or Inf.

    One reduction per tensor: the sum of a tensor with a NaN or Inf entry is not finite
    (read back as a Python number: ``torch.isfinite`` of a 0-d tensor is four more kernels,
    ~7 us a call).
    """
    if isinstance(value, Tensor):
        if not all_finite(value):
            raise FloatingPointError(
                f"curvlib: {what} of {module} contains NaN or Inf. Check the inputs, "
                "the loss and the learning rate (the forward pass already diverged)."
            )
    elif isinstance(value, (list, tuple)):
        for v in value:
            finite_or_raise(v, module, what)


def all_finite(value: Tensor) -> bool:
    """Whether ``value`` holds no NaN or Inf: one reduction (the sum of a tensor with a NaN or Inf
    entry is not finite), ``torch.isfinite`` only when the sum overflows. On a large tensor (a
    language model's logits) this reads it once and allocates no mask."""
    return not value.numel() or _finite_number(value.sum()) or bool(torch.isfinite(value).all())


def _finite_number(total: Tensor) -> bool:
    """Whether the 0-d tensor ``total`` is finite (one read-back)."""
    return bool(torch.isfinite(total)) if total.is_complex() else math.isfinite(total.item())


__all__ = ["LayerCapture", "SharedCapture", "Source", "source_key", "finite_or_raise", "in_param_dtype"]
