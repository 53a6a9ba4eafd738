r"""Updates in KFAC's eigenbasis: ``curvature="ekfac"`` and ``curvature="eigen-adam"``.

Both keep KFAC's factors as the running curvature (``state[p]["running"] = [G, A]``, mixed by
``ema_decay`` every ``T_cov``, as ``"kfac"``) and an eigenbasis ``Q = [Q0, Q1]`` of them
(``state[p]["eigenbasis"]``, refreshed every ``T_inv``). With the gradient viewed as a matrix
``Γ`` ``[d0, d1]`` (``d0 = p.shape[0]``, ``Q0`` over its rows: ``p.kfac``'s order) and the
rotation ``R(Γ) = Q0^T Γ Q1``:

- ``"ekfac"`` (George et al. 2018, "Fast Approximate Natural Gradient Descent in a
  Kronecker-factored Eigenbasis"): ``S`` (``state[p]["ekfac_S"]``, shaped like ``R(Γ)``) is the
  second moment of the per-sample gradients in the eigenbasis, measured in the same backward as
  the factors (:class:`~curvlib.extensions.EKFAC` with the running eigenbasis) and mixed by
  ``ema_decay`` every ``T_cov``; the direction is ``d = R^-1(R(Γ) / (S + λ))``
  (``damping_mode`` does not apply: the damping is added to ``S``).
- ``"eigen-adam"`` (SOAP's update, Vyas et al. 2024, on KFAC's factors instead of the gradient's
  Shampoo factors): Adam on the rotated gradient, ``m <- β1 m + (1-β1) R(Γ)``,
  ``v <- β2 v + (1-β2) R(Γ)^2``, ``d = R^-1(m̂ / (sqrt(v̂) + ε))`` with ``(β1, β2) = adam_betas``,
  ``ε = adam_eps`` and Adam's bias corrections (``state[p]["eigen_exp_avg"]``,
  ``["eigen_exp_avg_sq"]``, ``["eigen_step"]``); ``damping`` does not apply (``ε`` is its part).

Refreshing the eigenbasis (``T_inv``):

- ``"ekfac"``: ``Q' = eigh`` of the running factors; ``S`` is carried into the new basis as the
  diagonal of its matrix there, ``S' = (R0∘R0)^T S (R1∘R1)`` with ``R_i = Q_i^T Q'_i`` (the
  closest matrix with eigenvectors ``Q'``). The same carries ``S`` when a capture measured it in
  another basis (a cold start, below).
- ``"eigen-adam"``, as SOAP: ``eigh`` on the first refresh (cold start), then one power step and a
  QR factorization from the previous basis, ``Q' = qr(F Q_sorted)``, with ``Q``'s columns
  sorted by the estimated eigenvalues ``diag(Q^T F Q)`` (descending). Repeated refreshes of a
  fixed factor are subspace iteration: they converge to ``eigh``'s basis. ``m`` is rotated
  exactly, ``m' = R'(R^-1(m))``, and ``v`` is carried as ``S`` above (the diagonal of
  ``Q diag(v) Q^T`` in the new basis), which bounds every ``|m'_j| / sqrt(v'_j)`` by the
  root-sum-square of the ratios ``|m_i| / sqrt(v_i)`` of the old coordinates it mixes
  (Cauchy–Schwarz). SOAP permutes ``v`` with the sorted
  columns instead; with KFAC's MC factors, whose small-eigenvalue directions need not be those
  of small gradients, that put large ``m`` over small ``v`` after a refresh and blew the loss
  up on the CNN of ``benchmarks/time_to_loss.py`` (2.0 to 9.2 at the first refresh, lr 3e-3,
  ``T_cov=5``, ``T_inv=10``), and does not with ``v`` carried.

Factor forms (docs/design.md §2): a 1-D (diagonal) factor has the identity as its eigenbasis
(stored ``torch.ones(d)``, as :func:`~curvlib.extensions.kfac_eigenbasis`); a block-form factor
``[B, m, m]`` has one basis per block over ``B`` consecutive slices of the rows; a parameter with
one factor (a bias) is rotated as a vector. A tied parameter (a sum of Kronecker terms) has no
Kronecker eigenbasis: these curvatures refuse it (use ``"kfac"``).

Cold start of ``"ekfac"``: a capture in which a layer has a parameter without an eigenbasis yet
measures that layer's ``S`` in its own batch's KFAC eigenbasis (which is the running factors'
on the first capture, as the first capture initialises them); the optimizer carries ``S`` to
whichever basis it holds. Such a capture cannot be accumulated over several backwards.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from curvlib.extensions import EKFAC, KFAC, kfac_eigenbasis
from curvlib.optim.curvatures import KFACKind, unwrap
from curvlib.optim.tensors import Value

Basis = List[Tensor]


# ---------------------------------------------------------------- rotations


def _as_matrix(basis: Basis, x: Tensor) -> Tensor:
    """``x`` (shaped like the parameter, or like its ``R(Γ)``) laid out for ``basis``:
    ``[d0, d1]`` / ``[B, m, d1]`` (two factors), ``[d0, 1]`` / ``[B, m, 1]`` (one factor)."""
    Q0 = basis[0]
    if len(basis) == 2:
        if basis[1].dim() == 3 and Q0.dim() != 3:
            raise ValueError("curvlib.optim: an eigenbasis with a block-form second factor needs a block-form first one.")
        X = x.reshape(Q0.shape[-1] * (Q0.shape[0] if Q0.dim() == 3 else 1), -1)
    else:
        X = x.reshape(-1, 1)
    return X.reshape(Q0.shape[0], -1, X.shape[-1]) if Q0.dim() == 3 else X


def _left(Q: Tensor, X: Tensor, transpose: bool) -> Tensor:
    """``Q^T X`` (``transpose``) or ``Q X`` over the rows of ``X``; a 1-D ``Q`` is the identity."""
    if Q.dim() == 1:
        return X
    return (Q.mT if transpose else Q) @ X


def _right(Q: Tensor, X: Tensor, transpose: bool) -> Tensor:
    """``X Q^T`` (``transpose``) or ``X Q`` over the columns of ``X``; a 1-D ``Q`` is the identity."""
    if Q.dim() == 1:
        return X
    return X @ (Q.mT if transpose else Q)


def to_basis(basis: Basis, g: Tensor) -> Tensor:
    """``R(Γ) = Q0^T Γ Q1`` for ``g`` shaped like the parameter: ``[d0, d1]`` (``[B, m, n]`` in
    the block form) for two factors, ``[d0]`` (``[B, m]``) for one."""
    X = _left(basis[0], _as_matrix(basis, g), transpose=True)
    return _right(basis[1], X, transpose=False) if len(basis) == 2 else X.squeeze(-1)


def from_basis(basis: Basis, y: Tensor, shape: Sequence[int]) -> Tensor:
    """``R^-1(Y) = Q0 Y Q1^T``, reshaped to the parameter's ``shape``."""
    X = y if len(basis) == 2 else y.unsqueeze(-1)
    X = _left(basis[0], X, transpose=False)
    X = _right(basis[1], X, transpose=True) if len(basis) == 2 else X
    return X.reshape(shape)


def carry_diagonal(old: Basis, new: Basis, S: Tensor, shape: Sequence[int]) -> Tensor:
    """The diagonal, in ``new``, of the matrix with eigenvectors ``old`` and eigenvalues ``S``:
    ``S' = (R0∘R0)^T S (R1∘R1)``, ``R_i = old_i^T new_i`` (1-D bases: the identity)."""
    S = _as_matrix(new, S.reshape(shape))
    for i, (Qo, Qn) in enumerate(zip(old, new)):
        if Qo.dim() == 1 and Qn.dim() == 1:
            continue
        if Qo.dim() == 1:
            R = Qn
        elif Qn.dim() == 1:
            R = Qo.mT
        else:
            R = Qo.mT @ Qn
        W = R.square()
        S = W.mT @ S if i == 0 else S @ W
    return S if len(new) == 2 else S.squeeze(-1)


def qr_refresh(F: Tensor, Q: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """SOAP's refresh of a basis ``Q`` of the factor ``F``: the columns sorted by
    ``diag(Q^T F Q)`` (descending), then one power step and a QR factorization,
    ``Q' = qr(F Q_sorted).Q``. Returns ``(Q', order)`` (``order``: the sort, ``[m]`` or
    ``[B, m]``, as SOAP permutes its second moments with it; ``(Q, None)`` for a 1-D factor,
    whose basis is the identity)."""
    if F.dim() == 1:
        return Q, None
    est = ((F @ Q) * Q).sum(-2)
    order = torch.argsort(est, dim=-1, descending=True)
    Qs = Q.gather(-1, order.unsqueeze(-2).expand_as(Q))
    Qn, _ = torch.linalg.qr(F @ Qs)
    return Qn.contiguous(), order


# ---------------------------------------------------------------- the capture


class RunningEKFAC(EKFAC):
    """:class:`~curvlib.extensions.EKFAC` in the optimizer's running eigenbases, for the
    parameters of ``"ekfac"`` groups only (:meth:`use_basis`; other layers get nothing): a layer
    whose parameters all have a basis gets ``S`` in them; a layer with a parameter without one
    (its first capture) gets that parameter's ``S`` in its batch's KFAC eigenbasis, as
    ``EKFAC()`` (the basis comes with ``S`` in ``p.ekfac = [Q, S]``)."""

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1, kfac_approx: str = "expand"):
        super().__init__(fisher_type, mc_samples, kfac_approx, bases={})
        self.wanted: Set[int] = set()
        self.cold = False

    def use_basis(self, p: nn.Parameter, basis: Optional[Basis]) -> None:
        """Measure ``p``'s ``S`` in ``basis`` (``None``: in its batch's eigenbasis)."""
        self.wanted.add(id(p))
        if basis is not None:
            self.bases[id(p)] = (p, list(basis))

    def sources(self):
        return {self.source, self.basis_source}

    @property
    def accumulation(self) -> Optional[str]:  # type: ignore[override]
        return None if self.cold else "custom"

    def _eigenbases(self, capture):
        if all(id(p) in self.bases for p in capture.params.values()):
            return super()._eigenbases(capture)
        self.cold = True  # a batch eigenbasis: S of several backwards would mix bases
        batch = {
            name: kfac_eigenbasis(F, f"the KFAC factor of the {name} of {capture.module}")
            for name, F in self._kfac.compute(capture).items()
        }
        return {name: self.bases[id(p)][1] if id(p) in self.bases else batch[name] for name, p in capture.params.items()}

    def compute(self, capture):
        names = [n for n, p in capture.params.items() if id(p) in self.wanted]
        if not names:
            return {}
        if capture.uses is not None:
            raise NotImplementedError(_tied_message(f"the weight of {capture.module}"))
        if len(names) < len(capture.params):
            capture = capture.restricted(names)
        return super().compute(capture)


def _tied_message(name: str) -> str:
    return (
        f"curvlib.optim: {name} is tied (used by several layers): its KFAC curvature is a sum of Kronecker "
        "terms, which has no Kronecker eigenbasis for curvature='ekfac' / 'eigen-adam'. Put it in a param "
        "group with curvature='kfac' (inverted exactly)."
    )


# ---------------------------------------------------------------- the kinds


class EigenbasisKind(KFACKind):
    """Base of the curvatures stepping in KFAC's eigenbasis (module docstring): the running
    curvature is KFAC's, and :meth:`direction` (called by the optimizer at every step, instead of
    a cached inverse) keeps the per-parameter state of the basis."""

    #: the optimizer calls :meth:`direction` per parameter instead of building a Solve
    stateful = True
    distributed = False
    not_distributed = "its eigenbasis state is not synchronised across processes yet"

    def validate(self, group, where):
        if group.get("adaptive_damping"):
            raise ValueError(
                f"{where}: curvature={self.name!r} does not support adaptive_damping yet (the quadratic model "
                "needs its curvature product); set adaptive_damping=False."
            )

    def read(self, p, group):
        value = super().read(p, group)
        if value is not None and not isinstance(value[0], Tensor):
            raise ValueError(_tied_message(f"a parameter of shape {tuple(p.shape)}"))
        return value

    def mvp(self, params, curvs, vs):
        raise NotImplementedError(f"curvlib.optim: curvature={self.name!r} has no curvature product.")

    def inverse(self, params, curvs, damping, damping_mode, group):
        raise NotImplementedError(f"curvlib.optim: curvature={self.name!r} steps in its eigenbasis (direction()).")

    def direction(
        self, p: nn.Parameter, g: Tensor, running: Value, state: Mapping[str, Any], fresh: bool, refresh: bool,
        group: Mapping[str, Any], name: str,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """``p``'s direction and the entries of ``state[p]`` to write (``state``: ``opt.state[p]``
        with this step's entries; ``fresh``: the group captured this step; ``refresh``: ``T_inv``
        is due). Must not modify ``state``'s tensors (the step is a transaction)."""
        raise NotImplementedError


class EKFACKind(EigenbasisKind):
    """``ekfac``: KFAC's eigenbasis, eigenvalues from the per-sample gradients (module docstring)."""

    name = "ekfac"

    def extensions(self, group):
        return [
            KFAC(group["fisher_type"], group["mc_samples"], group["kfac_approx"]),
            RunningEKFAC(group["fisher_type"], group["mc_samples"], group["kfac_approx"]),
        ]

    def before_capture(self, p, state, extensions):
        for ext in map(unwrap, extensions):
            if isinstance(ext, RunningEKFAC):
                ext.use_basis(p, state.get("eigenbasis"))

    def direction(self, p, g, running, state, fresh, refresh, group, name):
        Q, S = state.get("eigenbasis"), state.get("ekfac_S")
        if fresh:
            measured = p.__dict__.get("ekfac")
            if measured is None:
                raise RuntimeError(
                    f"curvlib.optim: curvature='ekfac': {name} got KFAC factors but no EKFAC eigenvalues in this "
                    "capture; run the backward inside `with opt.capture():`."
                )
            Qm, Sm = list(measured[0]), measured[1]
            if S is None:
                Q, S = Qm, Sm
            else:
                if any(a is not b for a, b in zip(Q, Qm)):  # measured in another basis: carry S there
                    S, Q = carry_diagonal(Q, Qm, S, p.shape), Qm
                beta = float(group["ema_decay"])
                S = S * beta + Sm * (1.0 - beta)
        if S is None:
            raise RuntimeError(f"curvlib.optim: curvature='ekfac': {name} has no eigenvalues yet (no capture).")
        if refresh:
            new = kfac_eigenbasis(running, f"the running KFAC factor of {name}")
            S, Q = carry_diagonal(Q, new, S, p.shape), new
        d = from_basis(Q, to_basis(Q, g.to(S.dtype)) / (S + float(group["damping"])), p.shape)
        return d, {"eigenbasis": Q, "ekfac_S": S}


class EigenAdamKind(EigenbasisKind):
    """``eigen-adam``: Adam on the gradient rotated into KFAC's eigenbasis, SOAP's update on
    KFAC's factors (module docstring)."""

    name = "eigen-adam"

    def direction(self, p, g, running, state, fresh, refresh, group, name):
        Q = state.get("eigenbasis")
        m, v = state.get("eigen_exp_avg"), state.get("eigen_exp_avg_sq")
        t = int(state.get("eigen_step", 0))
        if Q is None:
            Q = kfac_eigenbasis(running, f"the running KFAC factor of {name}")
        elif refresh:
            new = [qr_refresh(F, Qi)[0] for F, Qi in zip(running, Q)]
            if m is not None:  # the same vector in the new basis; v as the diagonal of Q diag(v) Q^T there
                m, v = to_basis(new, from_basis(Q, m, p.shape)), carry_diagonal(Q, new, v, p.shape)
            Q = new
        b1, b2 = (float(b) for b in group["adam_betas"])
        gr = to_basis(Q, g.to(Q[0].dtype))
        t += 1
        m = gr * (1.0 - b1) if m is None else m * b1 + gr * (1.0 - b1)
        v = gr.square() * (1.0 - b2) if v is None else v * b2 + gr.square() * (1.0 - b2)
        step = (m / (1.0 - b1**t)) / ((v / (1.0 - b2**t)).sqrt() + float(group["adam_eps"]))
        d = from_basis(Q, step, p.shape)
        return d, {"eigenbasis": Q, "eigen_exp_avg": m, "eigen_exp_avg_sq": v, "eigen_step": t}


__all__ = [
    "EigenbasisKind", "EKFACKind", "EigenAdamKind", "RunningEKFAC", "to_basis", "from_basis", "carry_diagonal",
    "qr_refresh",
]
