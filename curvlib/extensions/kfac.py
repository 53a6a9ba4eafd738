"""KFAC: Kronecker factors of the curvature blocks of each layer.

For a weight with per-position factorisation ``dW_n = sum_t s_{n,t} a_{n,t}^T``
(see :mod:`curvlib.engine.layers.base`) and curvature sources ``s`` scaled as in
:mod:`curvlib.engine.capture`::

    expand:  A = 1/(N T) sum_{n,t} a a^T            G = sum_{k,n,t} s s^T
    reduce:  A = 1/N sum_n abar abar^T (abar = mean_t a)   G = sum_{k,n} sbar sbar^T (sbar = sum_t s)

so that ``kron(G, A)`` approximates the block of ``p.flatten()`` (Martens & Grosse 2015;
Grosse & Martens 2016; Eschenhagen et al. 2023 for expand/reduce). On Linear layers with
``fisher_type="type-2"`` these are BackPACK's KFLR factors; on Linear and Conv layers
``kron(G, A)`` equals curvlinops' ``KFACLinearOperator`` block. For a transposed
convolution the activation side is the *first* factor (see its adapter).

A layer called ``C`` times before one backward (shared weights, unrolled recurrences, a GAN's
discriminator on real and fake data; docs/design.md §2) has its calls summed as positions:

    expand:  A = 1/(sum_c N_c T_c) sum_{c,n,t} a a^T     G = sum_{c,k,n,t} s s^T
    reduce:  A = 1/(sum_c N_c) sum_{c,n} abar_c abar_c^T  G = sum_{c,k,n} sbar_c sbar_c^T

i.e. expand equals one call on the inputs stacked along a position dimension, and reduce
reduces within each call (as curvlinops reduces each call of a shared module) and then treats
the calls as positions. Both are one Gram matrix of the stacked vectors (the calls
concatenated along the position axis, one matmul: faster than one per call for many small
calls); with a structured factor (Embedding) or calls of different batch sizes, which KFAC
accepts, the factors are combined call by call (a loop over the calls of one layer). curvlinops'
``KFACLinearOperator`` hooks on a shared module *sum* ``A`` over the calls instead of averaging
(its ``A`` is ``C`` times this one for calls of equal size): this one is the stacked-position
convention of expand, under which the shared weight is a weight-sharing layer like a
convolution.

A parameter used by several *layers* (weight tying, :mod:`curvlib.engine.tying`: GPT-2's
``lm_head.weight = wte.weight``) gets one term per layer, in forward order, each the pair that
layer would give its own copy of the parameter and ordered like ``p.flatten()``:
``p.kfac = [[A_wte [V], G_wte [D, D]], [G_head [V, V], A_head [D, D]]]`` for the ``[V, D]``
weight, ``kron(F1, F2) + kron(H1, H2)`` approximating its block (the two-term form of
``p.kfac_corrected``, inverted exactly by :class:`~curvlib.solvers.KroneckerInverse`); a
parameter that every use sums over positions (a tied bias) gets ``[G1 + G2]``. Over several
backwards each term accumulates as above, with its own row counts.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch import Tensor

from curvlib.engine import factors
from curvlib.engine.capture import LayerCapture, Source
from curvlib.engine.factors import KFAC_APPROX, MAX_FACTOR_DIM
from curvlib.engine.layers.base import LayerAdapter
from curvlib.extensions.base import Extension
from curvlib.extensions.cross_kfac import CrossKFAC
from curvlib.extensions.factor_dims import FactorDims


class KFAC(FactorDims, Extension):
    """Kronecker factors ``p.kfac = [G, A]`` per weight, ``[G]`` per bias.

    Shapes: for a weight of shape ``[out, in, *kernel]`` (viewed ``[out, -1]`` row-major),
    ``G`` is ``[out, out]`` and ``A`` ``[in * prod(kernel), in * prod(kernel)]``, so that
    ``torch.kron(G, A)`` ``[p.numel(), p.numel()]`` approximates the curvature block of
    ``p.flatten()``; a bias gets ``[G]`` with the same ``G`` ``[out, out]``. Transposed
    convolutions (weight ``[in, out, *kernel]``) get ``[A, G]``: the first factor is always
    over ``p.shape[0]``.

    Scaling (module docstring for weight sharing): ``A = 1/(N T) sum_{n,t} a a^T`` over the
    layer inputs ``a`` (``T`` positions per sample, ``1`` for a plain Linear);
    ``G = sum s s^T`` over the output-side vectors ``s`` of the ``fisher_type``, which carry the
    loss reduction: ``reduction="mean"`` over ``N`` samples gives ``G = 1/N sum_n ...``
    (``1/(N mc_samples)`` for ``"mc"``), ``"sum"`` the plain sum. On Linear layers type-2 equals
    BackPACK's ``KFLR`` and mc has the scaling of BackPACK's ``KFAC``; on Linear and Conv
    layers ``kron(G, A)`` equals curvlinops' ``KFACLinearOperator`` block.

    ``fisher_type="mc"`` and ``"type-2"`` need the loss to be extended
    (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``); ``"empirical"`` works with a
    plain loss (it then assumes a mean over the batch).

    Args:
        fisher_type: ``"type-2"`` (exact GGN = Fisher of the loss's likelihood, columns of the
            loss-Hessian square root), ``"mc"`` (``mc_samples`` targets sampled from the model)
            or ``"empirical"`` (true-label gradients).
        mc_samples: sampled targets per datum, for ``"mc"`` only.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Eschenhagen et
            al. 2023).
        cross_layer: also build the cross-layer factors ``G_ij``, ``A_ij`` of all pairs of
            parameters (for the two-level ``"tpselepedis"`` coarse space); after the
            context they are in ``self.cross`` (a :class:`CrossKFAC`: ``cross_factors``,
            ``nested()``). Off by default: it keeps every layer's reduced vectors until
            the backward ends.
        max_factor_dim: a factor side of a larger dimension is stored 1-D, its diagonal (a
            vocabulary-sized ``G`` of a language-model head; the token side of an Embedding is
            1-D anyway), computed without forming the matrix; ``None``: every side dense.
            Default :data:`~curvlib.engine.factors.MAX_FACTOR_DIM` (8192, measured there).
            :meth:`limit_factor_dim` sets it per parameter. The block form (grouped
            convolutions, attention's ``in_proj``) and ``cross_layer`` refuse a larger side.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import KFAC
        >>> from curvlib.solvers import KroneckerInverse
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(KFAC(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> G, A = model[0].weight.kfac
        >>> G.shape, A.shape, torch.kron(G, A).shape
        (torch.Size([3, 3]), torch.Size([4, 4]), torch.Size([12, 12]))
        >>> [G.shape for G in model[0].bias.kfac]
        [torch.Size([3, 3])]
        >>> KroneckerInverse([[G, A]], damping=1e-3)(model[0].weight.grad).shape
        torch.Size([3, 4])
    """

    savefield = "kfac"
    exact_type2 = False
    accumulation = "custom"

    @property
    def coupled_samples(self) -> str:  # type: ignore[override]
        # KFAC approximates anyway (warned once); the cross-layer factors need independent samples
        return "raise" if self.cross is not None else "warn"

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        cross_layer: bool = False,
        max_factor_dim: Optional[int] = MAX_FACTOR_DIM,
    ):
        super().__init__(fisher_type, mc_samples)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"curvlib: KFAC(kfac_approx={kfac_approx!r}) is not one of {KFAC_APPROX}.")
        self._init_factor_dims(max_factor_dim)
        self.kfac_approx = kfac_approx
        self.cross: Optional[CrossKFAC] = CrossKFAC(fisher_type, mc_samples) if cross_layer else None
        #: id(weight) -> index of its activation factor ``A`` in ``p.kfac`` (1 for ``[G, A]``,
        #: 0 for ``[A, G]``); ``A`` is a mean over rows, the other factors carry the loss scaling
        self.act_index: Dict[int, int] = {}
        #: id(tied parameter) -> ``[(rows, act index)]`` per term of this context and of the
        #: latest backward (:meth:`_tied`, :meth:`accumulate`)
        self._tied_rows: Dict[int, Tuple[list, list]] = {}

    def sources(self) -> Set[Source]:
        return super().sources() | (self.cross.sources() if self.cross else set())

    def diagonal_sides(self, capture: LayerCapture, name: str) -> Tuple[bool, bool]:
        """``(cotangent side, activation side)``: which factor sides of parameter ``name`` are kept
        diagonal (1-D), their dimension being above its ``max_factor_dim`` (a summed parameter,
        ``[G]``, has the cotangent side only). Raises for the block form (grouped convolutions,
        attention's ``in_proj``) and for ``cross_layer``, which have no diagonal form."""
        sides = super().diagonal_sides(capture, name)
        if capture.summed(name):
            B = capture.adapter.bias_blocks(capture.module) if name == "bias" else 1
        else:
            B = capture.adapter.blocks(capture.module)
        if any(sides) and (B > 1 or self.cross is not None):
            self.refuse_large_factors(capture, (
                f"its block form over {B} groups has no diagonal form" if B > 1 else
                "cross_layer=True needs dense factors"))
        return (sides + (False,))[:2]

    def begin(self) -> None:
        self.act_index = {}
        self._tied_rows = {}
        if self.cross:
            self.cross.begin()

    def finish(self) -> None:
        if self.cross:
            self.cross.finish()

    def count(self, capture: LayerCapture) -> int:
        """Rows averaged in ``A``: ``N T`` (expand) or ``N`` (reduce), summed over the calls
        of a layer called several times (the calls are positions) and over the uses of a tied
        parameter."""
        if capture.uses is not None:
            return sum(self.count(u) for u, _ in capture.uses)
        if self.kfac_approx == "reduce" or "weight" not in capture.params or capture.summed("weight"):
            return sum(c.batch_size for c in capture.calls)
        return capture.act_rows()

    def accumulate(self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]) -> Any:
        """``G`` adds up (the loss scaling is in ``s``); ``A`` is a mean over rows, so the
        combined ``A`` weights each backward's by its row count."""
        if capture.summed(name) or (isinstance(new, list) and len(new) == 1):
            return [old[0] + new[0]]
        if capture.uses is not None or not isinstance(old[0], Tensor):
            return self._accumulate_tied(capture, name, old, new)
        n0, n1 = counts
        o = capture.orientation
        (G0, A0), (G1, A1) = o.unpair(old), o.unpair(new)
        return o.pair(G0 + G1, (A0 * n0 + A1 * n1) / (n0 + n1))

    def _stackable(self, capture: LayerCapture) -> bool:
        """Whether the calls of a shared layer can be stacked as positions (one batch size,
        no structured activation factor); otherwise the factors are combined call by call."""
        if type(capture.adapter).act_factor is not LayerAdapter.act_factor:
            return False
        return len({c.batch_size for c in capture.calls}) == 1

    def _stacked_factors(self, capture: LayerCapture) -> Tuple[list, list, Optional[Tensor]]:
        """``([G_weight], [G_bias], A)`` of a shared layer from its calls stacked as positions:
        expand concatenates the positions of all calls; reduce first reduces each call (mean of
        ``a``, sum of ``s`` over its positions) and stacks the calls."""
        params, src, calls = capture.params, self.source, capture.calls
        reduce = self.kfac_approx == "reduce"

        def stacked_cot(get):  # [K, N, positions, D]
            return torch.stack([get(c).sum(2) for c in calls], 2) if reduce else get(capture)

        Gw, Gb, A, G = [], [], None, None
        dg = False
        if "weight" in params and not capture.summed("weight"):
            B = capture.adapter.blocks(capture.module)
            dg, da = self.diagonal_sides(capture, "weight")
            s = stacked_cot(lambda c: c.cot(src))
            a = torch.stack([c.act().mean(1) for c in calls], 1) if reduce else capture.act()
            G = factors.kfac_cot_factor(s, "expand", B, diagonal=dg)
            A = factors.kfac_act_factor(a, "expand", B, diagonal=da)
            Gw.append(G)
        if "bias" in params:
            shared = type(capture.adapter).bias_cotangents is LayerAdapter.bias_cotangents
            Bb = capture.adapter.bias_blocks(capture.module)
            db = self.diagonal_sides(capture, "bias")[0]
            if G is None or G.dim() == 3 or not shared or Bb != 1 or db != dg:
                sb = stacked_cot(lambda c: c.bias_cot(src))
                G = factors.kfac_cot_factor(sb, "expand", Bb, diagonal=db)
            Gb.append(G)
        return Gw, Gb, A

    def column_reduction(self, source: Source):
        """``G`` (:meth:`cot_factors`) is a sum over the columns: the engine may back-propagate
        them in chunks and keep only the sums (not with ``cross_layer``, which needs the
        columns)."""
        if self.cross is not None or source != self.source:
            return None
        return self.cot_factors

    def cot_factors(self, capture: LayerCapture) -> Dict[str, Tensor]:
        """The cotangent-side factor of each parameter of a single-call capture: ``G`` of the
        weight and of the bias (the same tensor when the bias shares the weight's ``s``), the
        exact ``[G]`` of a norm layer's parameters. Sums over the columns ``k``."""
        params, src = capture.params, self.source
        if capture.has_summed_params:
            return {
                name: capture.kfac_summed_factor(name, src, self.diagonal_sides(capture, name)[0]) for name in params
            }
        out: Dict[str, Tensor] = {}
        B = capture.adapter.blocks(capture.module)
        dg = False
        if "weight" in params and not capture.summed("weight"):
            dg = self.diagonal_sides(capture, "weight")[0]
            out["weight"] = factors.kfac_cot_factor(capture.cot(src), self.kfac_approx, B, diagonal=dg)
        if "bias" in params:
            sb = capture.bias_cot(src)
            Bb = capture.adapter.bias_blocks(capture.module)
            db = self.diagonal_sides(capture, "bias")[0]
            G = out.get("weight")
            if G is None or sb is not capture.cot(src) or B != Bb or db != dg:
                G = factors.kfac_cot_factor(sb, self.kfac_approx, Bb, diagonal=db)
            out["bias"] = G
        return out

    def _from_reduction(self, capture: LayerCapture, red: Dict[str, Tensor]) -> Dict[str, Any]:
        """The factors of a single call whose ``G`` the engine summed chunk by chunk."""
        out: Dict[str, Any] = {}
        for name in capture.params:
            if name != "weight" or capture.summed(name):
                out[name] = [red[name]]
                continue
            B = capture.adapter.blocks(capture.module)
            A = capture.kfac_act_factor(self.kfac_approx, B, self.diagonal_sides(capture, name)[1])
            out[name] = capture.orientation.pair(red[name], A)
            self.act_index[id(capture.params[name])] = capture.orientation.act_index
        return out

    def _tied(self, capture: LayerCapture) -> Dict[str, Any]:
        """A parameter used by several layers (weight tying, :mod:`curvlib.engine.tying`): each
        use's KFAC term, in the order of ``p.flatten()`` (each use's factors ordered by its own
        orientation, the first over ``p.shape[0]``):

            p.kfac = [[F1, F2], [H1, H2], ...]      kron(F1, F2) + kron(H1, H2) + ...

        one term per layer using ``p`` (forward order; a layer called several times is one term,
        its calls as positions), each exactly the term the use would get with its own copy of
        ``p``; ``[G1 + G2 + ...]`` when every use sums ``p`` over positions (a tied bias)."""
        ((name, p),) = capture.params.items()
        if self.cross:
            raise NotImplementedError(
                f"curvlib: KFAC(cross_layer=True) does not support {capture.module}: the "
                "cross-layer factors need one reduced vector per layer and sample. Use "
                "cross_layer=False (its p.kfac is the sum of the uses' Kronecker terms)."
            )
        terms, rows = [], []
        for u, n in capture.uses:
            terms.append(self.compute(u)[n])
            rows.append((self.count(u), None if u.summed(n) else u.orientation.act_index))
        self.act_index.pop(id(p), None)  # (a nested value: no single activation factor)
        if all(len(t) == 1 for t in terms):
            return {name: [torch.stack([t[0] for t in terms]).sum(0)]}
        if any(len(t) == 1 for t in terms):
            raise NotImplementedError(
                f"curvlib: KFAC of {capture.module}: some uses sum the parameter over positions "
                "(a norm layer's scale or a bias, one factor) and some use it as a weight (two "
                "factors); their sum has no Kronecker form. Use the exact extensions "
                "(ExactBlockFisher, DiagGGN, GGNMP) for it."
            )
        total = self._tied_rows.get(id(p))
        self._tied_rows[id(p)] = (total[0] if total is not None else rows, rows)
        return {name: terms}

    def _accumulate_tied(self, capture: LayerCapture, name: str, old: Any, new: Any) -> Any:
        """The terms of several backwards: per term ``G`` adds up, ``A`` is weighted by rows."""
        p = capture.params[name]
        total, rows = self._tied_rows.get(id(p), ([], []))
        if capture.uses is None or len(old) != len(new) or not isinstance(old[0], list) or [r[1] for r in total] != [r[1] for r in rows]:
            raise ValueError(
                f"curvlib: KFAC of {capture.module} over several backwards of one context: the "
                "parameter's uses differ between the backwards (another set of layers used it), "
                "so their Kronecker terms cannot be matched. Run the same model in every backward."
            )
        out = []
        for (n0, ia), (n1, _), F_old, F_new in zip(total, rows, old, new):
            term = [F_old[i] + F_new[i] if i != ia else (F_old[i] * n0 + F_new[i] * n1) / (n0 + n1) for i in range(2)]
            out.append(term)
        self._tied_rows[id(p)] = ([(n0 + n1, ia) for (n0, ia), (n1, _) in zip(total, rows)], rows)
        return out

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        if capture.uses is not None:
            return self._tied(capture)
        params, src, out = capture.params, self.source, {}
        G = None
        red = capture.reduction(self, src) if len(capture.calls) == 1 and self.cross is None else None
        if red is not None:
            return self._from_reduction(capture, red)
        if capture.has_summed_params:  # norm layers: exact blocks sum x x^T, x = sum_t s
            if self.cross:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support {capture.module} yet (a "
                    "norm layer has no Kronecker factors to cross); use cross_layer=False or "
                    "leave the layer's parameters out (requires_grad=False)."
                )
            for name in params:
                out[name] = [capture.kfac_summed_factor(name, src, self.diagonal_sides(capture, name)[0])]
            return out
        calls = capture.calls
        if len(calls) > 1 and self.cross:
            raise NotImplementedError(
                f"curvlib: KFAC(cross_layer=True) does not support {capture.module}, which was "
                f"called {len(calls)} times before one backward (the cross-layer factors need "
                "one reduced vector per layer and sample); use cross_layer=False."
            )
        Gw: list = []
        Gb: list = []
        A, rows = None, 0
        if len(calls) > 1 and self._stackable(capture):  # the calls as positions, one Gram each
            calls = []
            Gw, Gb, A = self._stacked_factors(capture)
        dg, da = self.diagonal_sides(capture, "weight") if "weight" in params and not capture.summed("weight") else (False, False)
        db = self.diagonal_sides(capture, "bias")[0] if "bias" in params else False
        for c in calls:  # one call, or the calls of a shared layer one at a time
            Gc, B = None, 1
            if "weight" in params and not capture.summed("weight"):
                B = c.adapter.blocks(c.module)  # block form (grouped conv, attention)
                Gc = factors.kfac_cot_factor(c.cot(src), self.kfac_approx, B, diagonal=dg)
                Gw.append(Gc)
                Ac = c.kfac_act_factor(self.kfac_approx, B, da)  # Embedding: 1-D
                n = c.act_factor_rows(self.kfac_approx)  # rows per block where they differ
                if n is None:
                    n = c.batch_size if self.kfac_approx == "reduce" else c.act_rows()
                else:
                    n = n.view(-1, 1, 1)
                A = Ac if A is None else A * (rows / (rows + n)) + Ac * (n / (rows + n))
                rows = rows + n
            if "bias" in params:
                sb = c.bias_cot(src)
                Bb = c.adapter.bias_blocks(c.module)  # block form (attention's in_proj_bias)
                if Gc is None or sb is not c.cot(src) or B != Bb or db != dg:
                    Gc = factors.kfac_cot_factor(sb, self.kfac_approx, Bb, diagonal=db)
                Gb.append(Gc)
        if Gw:
            G = Gw[0] if len(Gw) == 1 else torch.stack(Gw).sum(0)
            out["weight"] = capture.orientation.pair(G, A)
            self.act_index[id(params["weight"])] = capture.orientation.act_index
        if Gb:
            out["bias"] = [Gb[0] if len(Gb) == 1 else torch.stack(Gb).sum(0)]
        if self.cross:
            if capture.structure().kind == "blocks" or capture.structure("bias").blocks > 1:
                raise NotImplementedError(
                    f"curvlib: KFAC(cross_layer=True) does not support the grouped {capture.module} "
                    "yet; use cross_layer=False."
                )
            self.cross.compute(capture)
        return out
