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

from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import factors
from curvlib.engine.layers.base import LayerAdapter
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
        self._act: Optional[Tensor] = None
        self._cot: Dict[Source, Tensor] = {}
        self._bias_cot: Dict[Source, Tensor] = {}

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
            p = getattr(self.module, name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out[name] = p
        return out

    def summed(self, name: str) -> bool:
        """Whether parameter ``name`` has per-sample gradients ``sum_t s'_{n,t}`` (a bias, or
        an elementwise scale of a norm layer) rather than ``sum_t s a^T``."""
        return name == "bias" or name in self.adapter.summed_params

    def has(self, source: Source) -> bool:
        return source == "empirical" and "grad" in self.raw or source in self.raw

    def _raw(self, source: Source) -> Tensor:
        if source == "empirical":
            return self.raw["grad"] * self.empirical_scale
        try:
            return self.raw[source]
        except KeyError:
            raise RuntimeError(
                f"curvlib: no {source!r} cotangents reached {self.module}. For "
                "fisher_type 'mc' and 'type-2' the loss must be extended: "
                "loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss()) (or MSELoss, "
                "BCEWithLogitsLoss, NLLLoss), and the model output must feed it."
            ) from None

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
        an extended model's forward, or the backward reached no extended loss or several.
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
        if len(self.loss_calls) > 1:
            raise NotImplementedError(
                f"curvlib: {who} found {len(self.loss_calls)} extended losses in one backward; "
                "it re-evaluates one loss only. Use GGNMP, or one loss per backward."
            )
        return Objective(self.root, self.root_inputs, self.loss_calls[-1])

    def per_sample_grads(self, name: str, source: Source) -> Tensor:
        """Per-sample gradients ``[K, N, *p.shape]`` of parameter ``name``.

        ``X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T`` (or its transpose for left-side
        layers), ``sum_t s'_{k,n,t}`` for the bias.
        """
        X = factors.per_sample_grads(self, name, source)
        return X.view(-1, self.batch_size, *X.shape[1:])


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

    One reduction per tensor: the sum of a tensor with a NaN or Inf entry is not finite.
    """
    if isinstance(value, Tensor):
        if value.numel() and not bool(torch.isfinite(value.sum())):
            if bool(torch.isfinite(value).all()):  # overflow of the sum only
                return
            raise FloatingPointError(
                f"curvlib: {what} of {module} contains NaN or Inf. Check the inputs, "
                "the loss and the learning rate (the forward pass already diverged)."
            )
    elif isinstance(value, (list, tuple)):
        for v in value:
            finite_or_raise(v, module, what)


__all__ = ["LayerCapture", "Source", "source_key", "finite_or_raise", "in_param_dtype"]
