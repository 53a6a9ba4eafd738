"""Loss adapters: the loss's curvature w.r.t. the model output as cotangent vectors.

For a loss ``L = c * sum_i l(f_i, y_i)`` over prediction positions ``i`` (``c = 1/N'`` for
``reduction="mean"``, ``N'`` the number of averaged terms; ``c = 1`` for ``"sum"``), the
adapters return cotangents ``S`` of shape ``[K, *f.shape]`` with

    sum_k S_k S_k^T = c * H_i   at every position i      (type-2: exact, K = #classes)
    E[sum_k S_k S_k^T] = c * F_i                          (mc: K = mc_samples draws)

where ``H_i = d^2 l / df_i^2`` is the loss Hessian (= the Fisher of the likelihood the
loss stands for). Back-propagating ``S`` through the network gives the factor
``J^T S`` of the GGN ``J^T (c H) J`` (Martens & Grosse 2015; Dangel et al. 2020, BackPACK).

The shared-column form (``exact=False``) applies column ``k`` at all positions of a sample
at once (curvlinops' KFAC convention for outputs with extra dimensions); ``exact=True``
spreads the columns over positions (``K = #classes * #positions``) so that the cotangents
factor the exact GGN also when the output has positions.
"""
from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn


class LossAdapter:
    """Describes one loss type. ``f``: the loss input (model output), ``y``: target."""

    module_types: ClassVar[Tuple[Type[nn.Module], ...]] = ()
    #: dimension of ``f`` that holds the classes / outputs of one prediction
    class_dim: ClassVar[int] = -1

    def check(self, loss: nn.Module) -> None:
        if loss.reduction not in ("mean", "sum"):
            raise ValueError(
                f"curvlib: {loss} has reduction={loss.reduction!r}; curvature needs "
                "reduction='mean' or 'sum'."
            )

    def mask(self, loss: nn.Module, f: Tensor, y: Tensor) -> Optional[Tensor]:
        """Boolean ``[*f.shape without class_dim]`` of the positions that count."""
        return None

    def normalization(self, loss: nn.Module, f: Tensor, y: Tensor) -> float:
        """``N'``: the number of terms the mean divides by (1 for ``"sum"``)."""
        if loss.reduction == "sum":
            return 1.0
        return float(f.numel())

    def sqrt_hessian(self, f: Tensor, y: Tensor) -> Tensor:
        """Unscaled shared-column square root ``[C, *f.shape]`` of the loss Hessian (a fresh
        tensor: the caller scales it in place)."""
        raise NotImplementedError

    def sample_gradients(self, f: Tensor, y: Tensor, m: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[m, *f.shape]`` gradients ``d l(f, y~) / df`` for ``m`` sampled targets, drawn
        with ``generator`` (``None``: the global RNG); a fresh tensor (the caller scales it in
        place)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def _scale(self, loss: nn.Module, f: Tensor, y: Tensor, S: Tensor, c: float) -> Tensor:
        """``S / sqrt(c N')``, zero at masked positions; in place (``S`` is the adapter's fresh
        tensor, as large as the logits times the columns for a language model)."""
        S.mul_(1.0 / math.sqrt(c * self.normalization(loss, f, y)))
        m = self.mask(loss, f, y)
        if m is not None:
            S.mul_(m.unsqueeze(self.class_dim % f.ndim).to(S.dtype))
        return S

    def type2_cotangents(self, loss: nn.Module, f: Tensor, y: Tensor, exact: bool) -> Tensor:
        """Scaled square root of the loss Hessian, ``[K, *f.shape]`` (module docstring)."""
        S = self._scale(loss, f, y, self.sqrt_hessian(f, y), 1.0)
        return spread_over_positions(S, self.class_dim % f.ndim) if exact else S

    def type2_positions(self, f: Tensor) -> int:
        """``P``: the output positions per sample, over which ``type2_cotangents(exact=True)``
        spreads each shared column (``K = C P``; the shared column is the sum of its ``P``
        spread columns)."""
        cd = self.class_dim % f.ndim
        return math.prod(s for d, s in enumerate(f.shape[1:], start=1) if d != cd)

    def mc_cotangents(
        self, loss: nn.Module, f: Tensor, y: Tensor, m: int, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Scaled gradients for ``m`` targets sampled from the model, ``[m, *f.shape]``."""
        return self._scale(loss, f, y, self.sample_gradients(f, y, m, generator), float(m))


def spread_over_positions(S: Tensor, class_dim: int) -> Tensor:
    """``[C, N, ..., C, ...]`` shared columns -> ``[C * P, N, ...]`` one column per
    (class, position) pair, ``P`` the number of positions per sample (1: unchanged)."""
    C, N = S.shape[0], S.shape[1]
    pos_shape = [s for d, s in enumerate(S.shape[2:], start=1) if d != class_dim]
    P = math.prod(pos_shape)
    if P == 1:
        return S
    # move class dim last: [C, N, P, C_out]
    Sm = S.movedim(1 + class_dim, -1).reshape(C, N, P, -1)
    eye = torch.eye(P, dtype=S.dtype, device=S.device)
    out = torch.einsum("knpc,pq->kqnpc", Sm, eye).reshape(C * P, N, *pos_shape, -1)
    return out.movedim(-1, 1 + class_dim)


def _class_eye(f: Tensor, class_dim: int) -> Tensor:
    """``I_C`` as ``[C(k), 1, ..., C at 1 + class_dim, ..., 1]``: column ``k`` of every
    prediction, broadcastable against ``[1, *f.shape]``."""
    C = f.shape[class_dim]
    shape = [C if d == class_dim else 1 for d in range(f.ndim)]
    return torch.eye(C, dtype=f.dtype, device=f.device).view(C, *shape)


class CrossEntropyAdapter(LossAdapter):
    """``CrossEntropyLoss`` on logits ``[N, C]`` or ``[N, C, d1, ...]``: categorical."""

    module_types = (nn.CrossEntropyLoss,)
    class_dim = 1

    def check(self, loss: nn.Module) -> None:
        super().check(loss)
        if loss.weight is not None or loss.label_smoothing != 0.0:
            raise NotImplementedError(
                f"curvlib: {loss} uses class weights or label smoothing; curvature is "
                "supported for the plain categorical likelihood only."
            )

    def _cdim(self, f: Tensor) -> int:
        return 1 if f.ndim > 1 else 0

    def mask(self, loss, f, y):
        if y.dtype.is_floating_point:  # class probabilities as targets
            return None
        keep = y != loss.ignore_index
        return None if bool(keep.all()) else keep

    def normalization(self, loss, f, y):
        if loss.reduction == "sum":
            return 1.0
        m = self.mask(loss, f, y)
        if m is not None:
            return float(m.sum())
        return float(f.numel() // f.shape[self._cdim(f)])

    def _probs(self, f: Tensor, dim: int) -> Tensor:
        """Class probabilities of ``f`` along ``dim`` (a fresh tensor)."""
        return f.softmax(dim)

    def sqrt_hessian(self, f, y):
        """``C - 1`` columns ``S`` with ``S S^T = diag(p) - p p^T`` (rank ``C - 1``).

        With ``q = sqrt(p)`` (unit norm), ``diag(p) - p p^T = D (I - q q^T) D``,
        ``D = diag(q)``; the Householder reflector ``P = I - 2 v v^T / v^T v`` with
        ``v = q + e_C`` maps ``q`` to ``-e_C``, so ``I - q q^T = P[:, :C-1] P[:, :C-1]^T``
        and ``S = D P[:, :C-1]`` (``v`` never vanishes since ``q_C >= 0``).
        """
        cd = self._cdim(f)
        p = self._probs(f, cd)
        if f.ndim > 2:
            # positions share columns: use curvlinops' square root so that KFAC's
            # cross-position terms agree with it; column k = sqrt(p_k) (e_k - p)
            sk = p.sqrt().movedim(cd, 0).unsqueeze(1 + cd)  # [C(k), ..., 1 at cd, ...]
            return sk * (_class_eye(f, cd) - p.unsqueeze(0))
        q = p.sqrt().movedim(cd, -1)  # [..., C]
        C = q.shape[-1]
        if C == 1:
            return torch.zeros(1, *f.shape, dtype=f.dtype, device=f.device)
        v = q.clone()
        v[..., -1] += 1.0
        beta = 2.0 / (v * v).sum(-1, keepdim=True)  # [..., 1]
        # S[..., c, k] = q_c (delta_ck - beta v_c v_k), k < C - 1
        vk = v[..., : C - 1]
        S = -(beta * q * v).unsqueeze(-1) * vk.unsqueeze(-2)  # [..., C, C-1]
        S.diagonal(dim1=-2, dim2=-1).add_(q[..., : C - 1])
        # -> [C-1, *f.shape]
        return S.movedim(-1, 0).movedim(-1, cd + 1)

    def _draws(self, f: Tensor, m: int, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        """Probabilities with the classes last ``p`` ``[..., C]`` (fresh) and ``m`` classes drawn
        from them ``[m, ..., 1]``.

        Classes last: the softmax, the sampler's cumsum and the one-hot scatter run along
        contiguous rows when ``f`` is a transposed ``[N, T, C]`` (a language model's logits), and
        the columns go back to that layout for the backward (no copy of logits-sized tensors)."""
        p = self._probs(f.movedim(self._cdim(f), -1), -1)
        draws = sample_categorical(p.reshape(-1, p.shape[-1]), m, generator)  # [P, m]
        return p, draws.T.reshape(m, *p.shape[:-1], 1)

    def sample_gradients(self, f, y, m, generator=None):
        p, draws = self._draws(f, m, generator)
        # p - onehot(draw), without the [m, *f.shape] integer one-hot (vocabulary-sized outputs);
        # one draw: written into the fresh p
        S = p.unsqueeze(0) if m == 1 else p.unsqueeze(0).repeat(m, *([1] * p.ndim))
        S.scatter_add_(-1, draws, torch.full_like(draws, -1, dtype=S.dtype))
        return S.movedim(-1, 1 + self._cdim(f))


class NLLAdapter(CrossEntropyAdapter):
    """``NLLLoss`` on log-probabilities: the Fisher w.r.t. the log-probability input is
    ``diag(p)``, which back-propagated through ``log_softmax`` gives ``diag(p) - p p^T``."""

    module_types = (nn.NLLLoss,)

    def check(self, loss):
        LossAdapter.check(self, loss)
        if loss.weight is not None:
            raise NotImplementedError(f"curvlib: {loss} uses class weights; unsupported.")

    def _probs(self, f, dim):
        p = f.exp()
        total = p.sum(dim)
        if not torch.allclose(total, torch.ones_like(total), atol=1e-3):
            raise ValueError(
                "curvlib: NLLLoss input must be log-probabilities (e.g. from "
                "log_softmax); its exp does not sum to 1 over the class dimension."
            )
        return p

    def sqrt_hessian(self, f, y):
        cd = self._cdim(f)
        p = self._probs(f, cd)
        return p.sqrt().movedim(cd, 0).unsqueeze(1 + cd) * _class_eye(f, cd)

    def sample_gradients(self, f, y, m, generator=None):
        p, draws = self._draws(f, m, generator)
        # d(-f[y~])/df = -e_y~
        S = torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device)
        S.scatter_(-1, draws, -1.0)
        return S.movedim(-1, 1 + self._cdim(f))


def sample_categorical(p: Tensor, m: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``m`` independent draws from each row of the categorical probabilities ``p`` ``[R, C]``
    (non-negative, rows summing to 1 up to rounding): class indices ``[R, m]``, inverse-CDF
    sampling, ``generator`` the random source (``None``: the global RNG).

    ``draw = min { k : c_k > u c_C }`` with ``c = cumsum(p)`` and ``u ~ U[0, 1)`` (one per row
    and draw): ``P(draw = k) = (c_k - c_{k-1}) / c_C = p_k / c_C``. One pass over ``p`` (the
    cumsum) and a binary search per draw, where ``torch.multinomial`` draws an exponential per
    class (12% of the GPT-2-small MC-KFAC step of ``benchmarks/bench_hf.py``, vocabulary 50,257).

    A class of probability 0 is never drawn: ``c_k = c_{k-1}`` there (the cumsum adds an exact 0;
    on CPU it accumulates in a wider type and rounds each entry, so ``c`` is non-decreasing), and
    ``u c_C`` rounding up to ``c_C`` is clamped to the last class of positive probability, not to
    ``C - 1``. Half-precision ``p`` is summed in float32. Each probability is resolved to the
    cumsum's rounding (half an ulp of 1: 6e-8 in float32).
    """
    acc = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else None
    c = p.cumsum(-1, dtype=acc)  # [R, C]
    total = c[:, -1:].contiguous()
    u = torch.rand(p.shape[0], m, dtype=c.dtype, device=c.device, generator=generator) * total
    draws = torch.searchsorted(c, u, right=True)  # first k with c_k > u
    last = torch.searchsorted(c, total)  # first k with c_k = c_C: the last positive class
    return torch.minimum(draws, last)


class _ElementwiseAdapter(LossAdapter):
    """Losses that are a sum over all elements; the last dimension holds the outputs of
    one prediction and all others but the first are positions (curvlinops' layout)."""

    class_dim = -1

    def _diag_sqrt(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def sqrt_hessian(self, f, y):
        return self._diag_sqrt(f).unsqueeze(0) * _class_eye(f, f.ndim - 1)


class MSEAdapter(_ElementwiseAdapter):
    """``MSELoss``: Gaussian likelihood with variance 1/2, ``H = 2 I``."""

    module_types = (nn.MSELoss,)

    def _diag_sqrt(self, f):
        return torch.full_like(f, math.sqrt(2.0))

    def sample_gradients(self, f, y, m, generator=None):
        # y~ = f + eps / sqrt(2)  =>  d (f - y~)^2 / df = -sqrt(2) eps
        return math.sqrt(2.0) * torch.randn(m, *f.shape, dtype=f.dtype, device=f.device, generator=generator)


class BCEWithLogitsAdapter(_ElementwiseAdapter):
    """``BCEWithLogitsLoss``: Bernoulli likelihood, ``H = diag(sigma (1 - sigma))``."""

    module_types = (nn.BCEWithLogitsLoss,)

    def check(self, loss):
        super().check(loss)
        if loss.weight is not None or loss.pos_weight is not None:
            raise NotImplementedError(
                f"curvlib: {loss} uses weight or pos_weight; unsupported."
            )

    def _diag_sqrt(self, f):
        s = f.sigmoid()
        return (s * (1 - s)).sqrt()

    def sample_gradients(self, f, y, m, generator=None):
        s = f.sigmoid()
        draws = torch.bernoulli(s.unsqueeze(0).expand(m, *s.shape), generator=generator)
        return s.unsqueeze(0) - draws


LOSS_ADAPTERS: Dict[Type[nn.Module], LossAdapter] = {}
for _a in (CrossEntropyAdapter(), NLLAdapter(), MSEAdapter(), BCEWithLogitsAdapter()):
    for _t in _a.module_types:
        LOSS_ADAPTERS[_t] = _a


def loss_adapter_for(loss: nn.Module) -> Optional[LossAdapter]:
    for t in type(loss).__mro__:
        if t in LOSS_ADAPTERS:
            return LOSS_ADAPTERS[t]
    return None
