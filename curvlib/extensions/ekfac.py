r"""EKFAC: KFAC with its eigenvalues corrected, from the same capture as KFAC.

George, Laurent, Bouthillier, Ballas & Vincent 2018, "Fast Approximate Natural Gradient Descent
in a Kronecker-factored Eigenbasis". For a weight with KFAC factors ``p.kfac = [F0, F1]``
(``F0`` over ``p.shape[0]``, see :mod:`curvlib.extensions.kfac`), eigenvectors
``Q_i = eigh(F_i)`` and the per-sample (per-column) gradients ``X_{k,n}`` of the weight viewed
``[d0, d1]`` (:mod:`curvlib.engine.factors`)::

    S = sum_{k,n} (Q0^T X_{k,n} Q1)^2          (elementwise square, [d0, d1])
    block = kron(Q0, Q1) diag(S.flatten()) kron(Q0, Q1)^T

That is ``S = diag(Q^T F Q)`` for ``Q = kron(Q0, Q1)`` and ``F = sum_{k,n} vec X vec X^T`` the
exact block of the capture source: of all matrices with eigenvectors ``Q``, the one closest to
``F`` in Frobenius norm (George et al., section 3). Only the eigenvalues change; the
eigenbasis is KFAC's.

The other factor forms (docs/design.md §2) keep their meaning:

- one factor (a bias, a norm layer's scale: ``p.kfac = [G]``): ``p.ekfac = [[Q0], S]``,
  ``S = sum_{k,n} (Q0^T x_{k,n})^2`` ``[d0]`` for the per-sample gradients ``x = sum_t s'``.
  Where ``[G]`` is the exact block (norm layers, a Linear's bias), ``S`` is its eigenvalues.
- a 1-D (diagonal) factor (Embedding's token frequencies ``A``): its eigenbasis is the identity,
  stored 1-D as ``torch.ones(V)`` (a 1-D factor is a diagonal matrix: ``diag(1) = I``; never a
  ``V x V`` matrix); ``S`` ``[V, D]`` is the per-row second moment ``sum_{k,n} (X_{k,n} Q_G)^2``.
- the block form (``F0 [B, m, m]``, ``F1 [B, n, n]``: grouped convolutions, attention's
  ``in_proj_weight``): one eigenbasis per block, ``S`` ``[B, m, n]`` from block ``b`` of the
  per-sample gradients, ``block = blockdiag_b(kron(Q0[b], Q1[b]) diag(S[b].flatten())
  kron(Q0[b], Q1[b])^T)`` over ``B`` consecutive slices of ``p.flatten()``; a block-form bias
  (``in_proj_bias``) gets ``[[Q0 [B, m, m]], S [B, m]]``.

Positions: ``X_{k,n} = sum_t s_{k,n,t} a_{n,t}^T`` is the per-sample gradient, summed over
the positions (and over the calls of a layer called several times), for ``kfac_approx``
``"expand"`` and ``"reduce"`` alike: ``kfac_approx`` changes only the eigenbasis. This is
curvlinops' ``EKFACLinearOperator`` (``compute_eigenvalue_correction_linear_weight_sharing``:
per-example gradients summed over the weight-sharing axis, for either approximation).

Columns: ``"mc"`` and ``"empirical"`` read the columns KFAC reads. For ``"type-2"`` the eigenbasis
is ``p.kfac``'s (columns shared over the output positions, curvlinops' KFAC convention) and
``S`` comes from the exact columns (one per class and output position, as ``DiagGGN`` and
``ExactBlockFisher``), so that ``S = diag(Q^T GGN Q)`` exactly. For ``[N, C]`` outputs the two
are the same columns (no extra work; equal to curvlinops); an output with ``P`` positions per
sample (sequences, segmentation) costs ``K = C P`` columns, for which ``"mc"`` is the unbiased
estimate at ``K = mc_samples``. One backward in either case.

Uniqueness: inside an eigenspace of a repeated eigenvalue the eigenbasis is any orthonormal
basis (``torch.linalg.eigh`` picks one), and ``S``, hence the block, depends on that choice. The
null space of an expand factor is harmless: every per-sample gradient is orthogonal to it
(``X_n q = sum_t s (a^T q) = 0`` for ``A q = 0``), so ``S`` is 0 there for any basis. The reduce
``A`` averages ``a`` over positions first, so with fewer samples than its dimension its null
space meets the per-sample gradients and the block is basis-dependent (curvlinops' as well).

Scaling: the columns carry the loss reduction (:mod:`curvlib.engine.capture`), so with
``reduction="mean"`` ``S = 1/N sum_n (Q0^T grad l_n Q1)^2`` (``1/(N M)`` over ``M`` mc samples),
with ``"sum"`` the plain sum: curvlinops' scaling.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from curvlib.engine import factors
from curvlib.engine.capture import LayerCapture, Source, source_key
from curvlib.engine.factors import KFAC_APPROX, MAX_FACTOR_DIM
from curvlib.extensions.base import Extension
from curvlib.extensions.kfac import KFAC
from curvlib.solvers._linalg import safe_eigh


def kfac_eigenbasis(kfac_factors: Sequence[Tensor], name: str = "a KFAC factor") -> List[Tensor]:
    """The eigenvectors of each factor of ``p.kfac`` (``[G, A]`` or ``[G]``), in its order.

    A ``[d, d]`` factor gives ``Q`` ``[d, d]`` (columns: eigenvectors, eigenvalues ascending, as
    ``torch.linalg.eigh``); a block-form factor ``[B, m, m]`` gives ``[B, m, m]``, one eigenbasis
    per block; a 1-D (diagonal) factor ``[d]`` gives ``torch.ones(d)``, the identity in the
    1-D form. Contiguous (``torch.linalg.eigh`` returns column-major eigenvectors, of which
    ``torch.kron(torch.eye(m), Q)`` raises in torch 2.13). ``eigh`` falls back to float64 (with a warning) rather than return NaN.
    """
    out = []
    for F in kfac_factors:
        if F.dim() == 1:
            out.append(torch.ones_like(F))
        else:
            # contiguous: torch.kron(I, Q) of eigh's column-major Q raises (torch 2.13)
            out.append(safe_eigh(F, name)[1].contiguous())
    return out


def _rotate_last(x: Tensor, Q: Tensor, blocks: int) -> Tensor:
    """``x [..., B m]`` with each slice ``b`` of the last dimension times ``Q[b]`` (``x_b^T Q_b``
    over the slices; ``Q [m, m]`` for ``B = 1``); a 1-D ``Q`` (the identity) leaves ``x``."""
    if Q.dim() == 1:
        return x
    if blocks == 1:
        return x @ Q
    xb = x.unflatten(-1, (blocks, -1))
    return torch.einsum("...bm,bmi->...bi", xb, Q).flatten(-2)


#: the contractions of :func:`_dense_S`
STRATEGIES = ("gram", "after", "first")


def _dense_S(s: Tensor, a: Tensor, Q_s: Tensor, Q_a: Tensor, strategy: Optional[str] = None) -> Tensor:
    """``sum_{k,n} (Q_s^T X_kn Q_a)^2`` ``[D_s, D_a]`` for ``X_kn = sum_t s_knt a_nt^T``, ``s [K, N,
    T, D_s]``, ``a [N, T, D_a]``, by the cheapest of three contractions (flop counts):

    - Gram (``T = 1``: one matmul): ``sum_n sum_{u,v} (sum_k s~_u s~_v) (a~_u a~_v)^T`` over the
      rotated ``s~ = s Q_s``, ``a~ = a Q_a``: ``N T^2 (K D_s + D_a + D_s D_a)``, memory
      ``N T^2 (D_s + D_a)`` (curvlinops' Gramian strategy);
    - per-sample gradients, rotated after: ``K N T D_s D_a + K N D_s D_a (D_s + D_a)``, memory
      ``K N D_s D_a`` (the per-sample gradients, as ``BatchGrad``): convolutions;
    - per-sample gradients of the rotated ``s~``, ``a~``: ``N T (K D_s^2 + D_a^2) + K N T D_s D_a``.

    ``strategy`` (one of :data:`STRATEGIES`) forces one (tests); ``None`` picks the cheapest.
    """
    K, N, T, Ds = s.shape
    Da = a.shape[-1]
    cost = {
        "gram": N * T * T * (K * Ds + Da + Ds * Da),
        "after": K * N * Ds * Da * (T + Ds + Da),
        "first": N * T * (K * Ds * Ds + Da * Da) + K * N * T * Ds * Da,
    }
    strategy = strategy or min(STRATEGIES, key=cost.__getitem__)
    if strategy == "gram":
        sr, ar = s @ Q_s, a @ Q_a
        if T == 1:
            return sr[:, :, 0].square().sum(0).T @ ar[:, 0].square()
        Gs = torch.einsum("knui,knvi->nuvi", sr, sr).reshape(-1, Ds)
        Ga = torch.einsum("nuj,nvj->nuvj", ar, ar).reshape(-1, Da)
        return Gs.T @ Ga
    X = s.new_empty(K * N, Ds, Da)
    if strategy == "after":
        factors.outer_sum(s, a, factors.RIGHT, X)
        X = Q_s.T @ X @ Q_a
    else:
        factors.outer_sum(s @ Q_s, a @ Q_a, factors.RIGHT, X)
    return X.square_().sum(0)


class EKFAC(Extension):
    """Eigenvalue-corrected KFAC ``p.ekfac = [[Q0, Q1], S]`` per weight, ``[[Q0], S]`` per bias.

    ``Q0, Q1`` are the eigenvectors of the KFAC factors in ``p.kfac``'s order (for a weight
    ``[G, A]``: ``Q0 = eigh(G)``, ``Q1 = eigh(A)``), ``S`` ``[d0, d1]`` (``d0 = p.shape[0]``) the
    second moment of the per-sample (per-column) gradients in that eigenbasis, and the
    curvature block of ``p.flatten()`` is ``kron(Q0, Q1) diag(S.flatten()) kron(Q0, Q1)^T``.
    For a bias or a norm layer's scale ``[[Q0], S]``, ``S [d0]``; 1-D (diagonal) factors have
    the eigenbasis ``torch.ones(d)`` and block-form factors one per block (module docstring).
    Equal to curvlinops' ``EKFACLinearOperator(separate_weight_and_bias=True)`` on Linear and
    Conv layers.

    Scaling: as the loss, ``S = 1/N sum_n (Q0^T grad l_n Q1)^2`` for ``reduction="mean"`` over
    ``N`` samples (``1/(N mc_samples)`` for ``"mc"``), the plain sum for ``"sum"``; the per-sample
    gradients are summed over positions (conv, sequences). ``"mc"`` and ``"type-2"`` need the
    loss to be extended (``loss_fn = curvlib.extend(torch.nn.CrossEntropyLoss())``).

    Computed in the same backward as KFAC (no second one): the factors, their eigenvectors and
    ``S`` from the captured layer inputs and output-side vectors.

    Several backwards in one context (gradient accumulation): ``S`` of the whole batch needs the
    eigenbasis of the whole batch's factors, which is known only after the last micro-batch.
    Without ``bases`` the second backward raises; curvlinops' two passes work here too: KFAC
    over the micro-batches first, then ``EKFAC(bases=...)`` over them again, which adds up ``S``
    in the given (fixed) eigenbases::

        with curvature(KFAC(fisher_type="mc")):
            for x, y in micro_batches: (loss_fn(model(x), y) * len(x) / N).backward()
        bases = {p: kfac_eigenbasis(p.kfac) for p in model.parameters()}
        with curvature(EKFAC(fisher_type="mc", bases=bases)):
            for x, y in micro_batches: (loss_fn(model(x), y) * len(x) / N).backward()

    Args:
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"`` (``"type-2"``: ``S`` from the exact
            columns, see the module docstring).
        mc_samples: sampled targets per datum, for ``"mc"`` only.
        kfac_approx: ``"expand"`` or ``"reduce"``: the KFAC factors whose eigenbasis is used.
        bases: optional ``{parameter: [Q0, Q1] or [Q0]}``: compute ``S`` in these eigenbases
            (e.g. of running KFAC factors, or ``p.ekfac[0]`` of an earlier step) instead of this
            batch's; no KFAC factors are computed, and several backwards add up ``S``. Every
            parameter that gets curvature must have one.
        max_factor_dim: the KFAC factors' (:class:`KFAC`): a side above it is a 1-D factor
            whose eigenbasis is the identity (``torch.ones(d)``), so that side of ``S`` is the
            per-coordinate second moment; ``None``: every side dense.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import EKFAC
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # needed for "mc" and "type-2"
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> with curvature(EKFAC(fisher_type="type-2")):
        ...     loss_fn(model(x), y).backward()
        >>> (Q0, Q1), S = model[0].weight.ekfac
        >>> Q0.shape, Q1.shape, S.shape
        (torch.Size([3, 3]), torch.Size([4, 4]), torch.Size([3, 4]))
        >>> Q = torch.kron(Q0, Q1)
        >>> (Q @ torch.diag(S.flatten()) @ Q.T).shape  # the block of model[0].weight.flatten()
        torch.Size([12, 12])
        >>> [t.shape for t in model[0].bias.ekfac[0]], model[0].bias.ekfac[1].shape
        ([torch.Size([3, 3])], torch.Size([3]))
    """

    savefield = "ekfac"
    #: ``S`` reads the exact type-2 columns (the eigenbasis KFAC's shared ones, see the module)
    exact_type2 = True
    #: an approximation like KFAC: with samples coupled by the forward it warns (once per model)
    coupled_samples = "warn"

    def __init__(
        self,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        bases: Optional[Mapping[nn.Parameter, Sequence[Tensor]]] = None,
        max_factor_dim: Optional[int] = MAX_FACTOR_DIM,
    ):
        super().__init__(fisher_type, mc_samples)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"curvlib: EKFAC(kfac_approx={kfac_approx!r}) is not one of {KFAC_APPROX}.")
        self.kfac_approx = kfac_approx
        self._kfac = KFAC(fisher_type, mc_samples, kfac_approx, max_factor_dim=max_factor_dim)
        self.bases: Optional[Dict[int, Tuple[nn.Parameter, List[Tensor]]]] = None
        if bases is not None:
            self.bases = {id(p): (p, list(Q)) for p, Q in bases.items()}

    @property
    def max_factor_dim(self) -> Optional[int]:
        """The KFAC factors' ``max_factor_dim`` (a side above it: a 1-D factor, identity basis)."""
        return self._kfac.max_factor_dim

    def limit_factor_dim(self, params, max_factor_dim: Optional[int]) -> "EKFAC":
        """:meth:`KFAC.limit_factor_dim` of the factors whose eigenbasis is used; returns ``self``."""
        self._kfac.limit_factor_dim(params, max_factor_dim)
        return self

    @property
    def accumulation(self) -> Optional[str]:  # type: ignore[override]
        """``"custom"`` (``S`` adds up) with fixed ``bases``; ``None`` without: the engine raises
        at a second backward in the context (class docstring: two passes instead)."""
        return "custom" if self.bases is not None else None

    @property
    def basis_source(self) -> Source:
        """The columns of the KFAC factors whose eigenbasis is used (``p.kfac``'s)."""
        return self._kfac.source

    def sources(self) -> Set[Source]:
        return {self.source} if self.bases is not None else {self.source, self.basis_source}

    def begin(self) -> None:
        self._kfac.begin()

    def accumulate(self, capture: LayerCapture, name: str, old: Any, new: Any, counts: Tuple[int, int]) -> Any:
        """With fixed ``bases``: the same eigenbasis, ``S`` summed (the columns carry the
        micro-batch scaling, as KFAC's ``G``)."""
        return [old[0], old[1] + new[1]]

    def _eigenbases(self, capture: LayerCapture) -> Dict[str, List[Tensor]]:
        """``{name: [Q0, Q1] or [Q0]}`` for the layer's parameters: of this backward's KFAC
        factors (``p.kfac``'s, computed as :class:`KFAC` does), or the given ``bases``."""
        if self.bases is None:
            return {
                name: kfac_eigenbasis(F, f"the KFAC factor of the {name} of {capture.module}")
                for name, F in self._kfac.compute(capture).items()
            }
        out = {}
        for name, p in capture.params.items():
            if id(p) not in self.bases:
                raise KeyError(
                    f"curvlib: EKFAC(bases=...) has no eigenbasis for the {name} of "
                    f"{capture.module}; give one for every parameter that gets curvature "
                    "(e.g. {p: kfac_eigenbasis(p.kfac) for p in model.parameters()}), or set "
                    "requires_grad=False on the ones to leave out."
                )
            out[name] = self.bases[id(p)][1]
        return out

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        src = self.source
        out: Dict[str, Any] = {}
        if capture.uses is not None and self.bases is None:
            raise NotImplementedError(
                f"curvlib: EKFAC of {capture.module}, which is used by {len(capture.uses)} layers "
                "(weight tying): its KFAC curvature is a sum of Kronecker terms (one per use), "
                "which has no Kronecker eigenbasis. Give one (EKFAC(bases={p: [Q0, Q1]}), e.g. the "
                "eigenvectors of the first term of p.kfac), or use KFAC (inverted exactly by "
                "KroneckerInverse), KPSVD or the exact extensions for it."
            )
        for name, Q in self._eigenbases(capture).items():
            if capture.summed(name):
                S = self._summed_S(capture, name, Q, src)
            else:
                S = self._weight_S(capture, name, Q, src)
            out[name] = [Q, S]
        return out

    # ------------------------------------------------------------------ S
    def _summed_S(self, capture: LayerCapture, name: str, Q: List[Tensor], src: Source) -> Tensor:
        """``S = sum_{k,n} (Q0^T x_kn)^2`` for a summed parameter (``x = sum_t s'``), ``[d0]`` or
        ``[B, m]`` for a block-form ``Q0 [B, m, m]``."""
        (Q0,) = _check(Q, 1, capture, name)
        x = capture.sum_cot(name, src).sum(2)  # [K, N, d]
        B = Q0.shape[0] if Q0.dim() == 3 else 1
        S = _rotate_last(x, Q0, B).square_().sum((0, 1))
        return S.view(B, -1) if Q0.dim() == 3 else S

    def _weight_S(self, capture: LayerCapture, name: str, Q: List[Tensor], src: Source) -> Tensor:
        """``S = sum_{k,n} (Q0^T X_kn Q1)^2`` ``[d0, d1]`` (``[B, m, n]`` in the block form) of a
        weight: a dense pair by :func:`_dense_S` from the captured ``s`` and ``a``; structured
        layers (1-D or block-form factors, grouped convolutions, Embedding) through the layer's
        per-sample gradients of the cotangent-side-rotated ``s``, rotated on the activation
        side after."""
        p = capture.params[name]
        if capture.uses is not None:  # a tied parameter: its per-sample gradients, in p's order
            Q0, Q1 = _check(Q, 2, capture, name)
            if Q0.dim() == 3 or Q1.dim() == 3:
                raise ValueError(f"curvlib: EKFAC of {capture.module} takes a dense or 1-D basis pair, not the block form.")
            X = capture.per_sample_grads(name, src).flatten(0, 1).reshape(-1, p.shape[0], p[0].numel())
            X = X if Q0.dim() == 1 else Q0.T @ X  # (a 1-D basis is the identity, kfac_eigenbasis)
            X = X if Q1.dim() == 1 else X @ Q1
            return X.square_().sum(0)
        orient = capture.orientation
        Q_cot, Q_act = orient.unpair(_check(Q, 2, capture, name))
        B = Q_cot.shape[0] if Q_cot.dim() == 3 else 1
        s = capture.cot(src)  # [K, N, T, D_s]
        d0 = p.shape[0]
        if B == 1 and Q_cot.dim() == 2 and Q_act.dim() == 2:  # a dense pair: X = sum_t s a^T
            return orient.from_cot_act(_dense_S(s, capture.act(), Q_cot, Q_act)).contiguous()
        s = _rotate_last(s, Q_cot, B)
        X = s.new_empty(s.shape[0] * s.shape[1], *p.shape)
        if capture.structured_weight(s, X) is None:
            factors.outer_sum(s, capture.act(), orient, X)
        X = X.view(X.shape[0], B, d0 // B, -1)  # [K N, B, d0 / B, d1]: the blocks of p
        if Q_act.dim() > 1:
            Qa = Q_act if Q_act.dim() == 3 else Q_act.unsqueeze(0)
            if orient.act_side == "right":
                X = torch.einsum("rbij,bjl->rbil", X, Qa)
            else:
                X = torch.einsum("bji,rbjl->rbil", Qa, X)
        S = X.square_().sum(0)
        return S if B > 1 else S[0]


def _check(Q: List[Tensor], n: int, capture: LayerCapture, name: str) -> List[Tensor]:
    if len(Q) != n:
        raise ValueError(
            f"curvlib: EKFAC got {len(Q)} eigenbases for the {name} of {capture.module}, which "
            f"has {n} Kronecker factor(s) (p.kfac's form: {'[G, A]' if n == 2 else '[G]'})."
        )
    return Q


__all__ = ["EKFAC", "kfac_eigenbasis"]
