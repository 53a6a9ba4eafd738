"""How a parameterised layer turns (input, output gradient) into per-sample matrices.

For every parameterised layer type, one adapter states the *per-position factorisation*
of the per-sample gradient of its weight:

    right side (Linear, Conv):  dW_n = sum_t  s_{n,t} a_{n,t}^T     (W viewed as [D_s, D_a])
    left side (ConvTranspose):  dW_n = sum_t  a_{n,t} s_{n,t}^T     (W viewed as [D_a, D_s])

with ``a`` built from the layer input only ("activation side") and ``s`` built from a
cotangent w.r.t. the layer output ("cotangent side"). The bias gradient is
``db_n = sum_t s'_{n,t}`` for cotangent vectors ``s'`` (equal to ``s`` except for
transposed convolutions). Every extension is written against this description only,
through :mod:`curvlib.engine.factors` (orientation, per-sample gradients, Gram matrices, KFAC
factors, the structure of the block): a new layer is one adapter and no extension changes.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Protocol, Tuple, Type

from torch import Tensor, nn


class LayerAdapter:
    """Describes one layer type (see module docstring). Stateless."""

    module_types: ClassVar[Tuple[Type[nn.Module], ...]] = ()
    #: ``"right"``: weight viewed as ``[D_s, D_a]``; ``"left"``: as ``[D_a, D_s]``
    act_side: ClassVar[str] = "right"
    #: parameters besides ``bias`` whose per-sample gradient is ``sum_t s'_{n,t}`` of
    #: :meth:`param_cotangents` (elementwise scales of norm layers): they get the exact block
    #: ``[G]`` as a bias does, and no activation side
    summed_params: ClassVar[Tuple[str, ...]] = ()

    #: the layer treats every dimension between the samples (0) and its features as positions
    #: (Linear, Embedding, LayerNorm, RMSNorm): a call on rows that merge ``m`` positions of each
    #: sample into dimension 0 is recorded on the per-sample views ``[N, m, ...]``
    #: (:mod:`~curvlib.engine.layers.batch_layout`; e.g. OPT's ``fc1`` on ``hidden.reshape(-1, D)``)
    positions: ClassVar[bool] = False

    def check(self, module: nn.Module) -> None:
        """Raise ``NotImplementedError`` naming the module for unsupported settings."""

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        return x.shape[0]

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x`` (the layer input) -> ``a`` of shape ``[N, T, D_a]``."""
        raise NotImplementedError

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        """``g`` of shape ``[K, *output.shape]`` -> ``s`` of shape ``[K, N, T, D_s]``."""
        raise NotImplementedError

    def blocks(self, module: nn.Module) -> int:
        """``B``: KFAC gives the weight in the block form ``p.kfac = [G [B, m, m], A [B, n, n]]``
        (docs/design.md §2) over ``B`` slices of the weight's rows; ``1``: one dense pair. The
        cotangent side ``s`` is ``[.., B m]`` with slice ``b`` belonging to block ``b``; the
        activation side is laid out as :meth:`grouped` says."""
        return 1

    def grouped(self, module: nn.Module) -> bool:
        """Whether the activations are in the *grouped* layout (grouped convolutions): ``a`` is
        ``[N, T, B n]`` and block ``b`` uses only the slice ``[b n, (b+1) n)``, so that the
        per-sample gradient is not the plain ``sum_t s a^T`` (:meth:`per_sample_weight` and the
        extensions' grouped paths apply). ``False`` with ``B > 1``: ``a`` is ``[N, T, n]`` shared
        by all blocks (the weight is an ordinary ``[B m, n]`` matrix, e.g. the stacked q/k/v
        projections of attention) and :meth:`act_factor` must give the ``[B, n, n]`` factor."""
        return self.blocks(module) > 1

    def bias_blocks(self, module: nn.Module) -> int:
        """``B`` of the bias factor ``p.kfac = [G [B, m, m]]`` (``1``: dense ``[G]``)."""
        return 1

    #: composite layers (``nn.MultiheadAttention``) apply their parameters functionally: instead
    #: of one forward hook, :meth:`intercept` gives the context manager that records their parts
    composite: ClassVar[bool] = False

    def intercept(self, module: nn.Module, record):
        """For :attr:`composite` adapters: a context manager active during ``module``'s forward
        that calls ``record(part, x, y)`` for every linear part (``part`` a layer-like object
        with its own adapter, ``x`` its input ``[N, ...]``, ``y`` its output in the graph)."""
        raise NotImplementedError

    def act_count(self, module: nn.Module, x: Tensor) -> Optional[int]:
        """Rows ``N T`` of :meth:`activations`, if known without forming them (else ``None``)."""
        return None

    def act_factor(self, module: nn.Module, x: Tensor, kfac_approx: str) -> Optional[Tensor]:
        """A structured KFAC activation factor (e.g. 1-D diagonal) computed without the dense
        activations, or ``None`` for the generic ``a^T a`` (see :mod:`curvlib.extensions.kfac`)."""
        return None

    def act_gram(self, module: nn.Module, x: Tensor, act: Callable[[], Tensor]) -> Optional[Tensor]:
        """``sum_{n,t} a_{n,t} a_{n,t}^T`` ``[D_a, D_a]`` of the activations ``a = act()`` (=
        ``activations(x)``, formed and cached on the first call: a kernel that needs no ``a``
        leaves it unformed) by a kernel of the layer's own that is faster than the Gram matrix
        of ``a``, or ``None`` (then :func:`curvlib.engine.factors.gram_rows` of ``a``)."""
        return None

    def act_factor_rows(self, module: nn.Module, x: Tensor, kfac_approx: str) -> Optional[Tensor]:
        """For a block-form :meth:`act_factor` whose blocks average different numbers of rows
        (attention's in_proj in cross-attention: ``N L`` query rows, ``N S`` key rows): the rows
        of each block, ``[B]``, by which the factors of several calls are averaged; ``None``:
        every block averages the call's :meth:`act_count` rows (``N`` for reduce)."""
        return None

    def per_sample_weight(self, module: nn.Module, s: Tensor, x: Tensor, out: Tensor) -> Optional[Tensor]:
        """Per-sample weight gradients from ``s`` ``[K, N, T, D_s]`` written to ``out``
        (contiguous, ``K N`` times the weight) without the dense activations, or ``None``
        for the generic ``sum_t s a^T``."""
        return None

    def weight_map(self, module: nn.Module, x: Tensor) -> Optional["WeightMap"]:
        """The weight's linear map ``V -> layer(x; weight=V, no bias)`` and its transpose through
        the layer's own kernels (e.g. convolutions), or ``None`` (the default) where products go
        through the activations ``a`` (:meth:`activations`). Exact GGN products use it to apply a
        block without forming the unfolded patches (:class:`curvlib.extensions.ggnmp.LayerFactors`)."""
        return None

    def param_cotangents(self, module: nn.Module, name: str, g: Tensor, x: Tensor) -> Tensor:
        """For ``name`` in :attr:`summed_params`: ``g`` ``[K, *output.shape]`` -> ``[K, N, T', numel]``."""
        raise NotImplementedError

    def bias_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        """``g`` of shape ``[K, *output.shape]`` -> ``s'`` of shape ``[K, N, T', D_out]``."""
        return self.weight_cotangents(module, g, x)


class WeightMap(Protocol):
    """The linear map of a layer's weight on one batch of inputs ``x`` (:meth:`LayerAdapter.weight_map`).

    With ``D_s T`` the entries of one sample's output in its own memory order (channel-major for
    convolutions: the order of the raw output cotangents ``[K, N, *output.shape[1:]]`` flattened):

    - ``forward(V)``: ``V [B, *weight.shape]`` -> ``[N, B, D_s T]``, the layer's output without
      bias for the weights ``V_b`` (``sum_t`` structure: ``s``-side entry ``(o, t)`` is
      ``(V_b a_{n,t})_o``);
    - ``backward(U)``: ``U [N, B, D_s T]`` -> ``[B, *weight.shape]``, the weight gradient
      ``sum_n`` of the output gradients ``U_{n,b}`` (the transpose of ``forward`` summed over ``n``).
    """

    def forward(self, V: Tensor) -> Tensor: ...

    def backward(self, U: Tensor) -> Tensor: ...
