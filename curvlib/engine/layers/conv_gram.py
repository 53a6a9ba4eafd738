r"""The Gram matrix of a convolution's patches without unfolding them: shift correlations.

For a stride-1, dilation-1 convolution with kernel ``k`` (``d`` spatial dimensions) and zero
padding ``P`` (per dimension, symmetric) of ``x [N, C, *L]``, the patch Gram matrix is

    A[(o, p), (c, q)] = sum_{n, t} x_pad[n, o, t + p] x_pad[n, c, t + q]

(``p, q`` kernel offsets, ``t`` output positions, patch layout channel-major as in
:func:`~curvlib.engine.unfold.unfold`). With ``u = t + p - P`` (a position of ``x`` itself;
the padding contributes zeros) and ``delta = q - p``:

    A_pq[o, c] = sum_{u in R_p} x[o, u] x[c, u + delta],   R_p = prod_i [p_i - P_i, p_i - P_i + out_i)

and ``R_p`` is all of ``x``'s positions but a few border rows ``E_i(p_i)`` per dimension
(``[0, p_i - P_i)`` and ``[p_i - P_i + out_i, L_i)``). By inclusion-exclusion over the
dimensions,

    A_pq = sum_{S subset of dims} (-1)^{|S|} sum_{r in prod_{i in S} E_i(p_i)} F^S_delta(r),

``F^S_delta(r)`` the correlation at shift ``delta`` summed over the positions whose coordinates
in ``S`` are ``r`` (``S`` empty: over all positions). Each ``F^S`` for all ``(2k-1)^d`` shifts
is one weight-gradient kernel (output gradient ``x`` (its border slice), input ``x`` padded by
``k - 1``, kernel ``2k - 1``; the border slices of one ``S`` stacked as groups of one kernel).
The full correlation needs only the shifts with ``delta_0 >= 0`` (``F_{-delta} = F_delta^T``):
``k_0 (2k-1)^{d-1} / k^{2d}`` of the patch Gram's products (3x3: 15/81), the border terms about
``|B_i| / L_i`` of the full one per dimension; no ``[N, T, C k^d]`` patch tensor is formed. Small CNN of ``benchmarks/bench_kfac.py`` (16 -> 32 channels, 3x3, 14x14,
batch 64): see :func:`shift_gram`'s measurement.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _excluded(p: int, P: int, k: int, L: int) -> List[int]:
    """``E(p)``: the positions of ``x`` (one dimension, length ``L``) that kernel offset ``p`` never
    reads at any output position (padding ``P``, kernel ``k``, stride and dilation 1)."""
    out = L + 2 * P - k + 1
    lo, hi = p - P, p - P + out
    return [r for r in range(L) if r < lo or r >= hi]


def shift_cost(L: Sequence[int], P: Sequence[int], k: Sequence[int]) -> float:
    """Cost of :func:`shift_gram` over that of the unfolded Gram (both ``N C^2`` times a count of
    multiply-adds per position): ``(2k-1)^d prod_i (L_i + |B_i|)`` over ``k^{2d} prod_i out_i``,
    ``B_i`` the border rows of dimension ``i`` (an upper bound: it ignores the halved full
    correlation)."""
    new = old = 1.0
    for Li, Pi, ki in zip(L, P, k):
        border = {r for p in range(ki) for r in _excluded(p, Pi, ki, Li)}
        new *= (2 * ki - 1) * (Li + len(border))
        old *= ki * ki * (Li + 2 * Pi - ki + 1)
    return new / old


@functools.lru_cache(maxsize=64)
def _plan(k: Tuple[int, ...], P: Tuple[int, ...], L: Tuple[int, ...]) -> Tuple[list, Tensor, Tensor]:
    """The inclusion-exclusion of :func:`shift_gram` for one geometry (cached):

    - ``groups``: per subset ``S`` of dimensions, the border-row combinations (a tuple per
      combination, ``None`` in the dimensions not in ``S``; the empty ``S`` first);
    - ``coef [J, prod(k)]``: the sign of each combination's term for each kernel offset ``p``
      (``(-1)^{|S|}`` where every fixed row is in ``E_i(p_i)``, else 0);
    - ``idx [prod(k), prod(k)]``: the flat shift index of ``q - p + (k - 1)`` for each ``(p, q)``.
    """
    d = len(k)
    excl = [[_excluded(p, P[i], k[i], L[i]) for p in range(k[i])] for i in range(d)]
    border = [sorted({r for e in excl[i] for r in e}) for i in range(d)]
    offsets = list(itertools.product(*[range(ki) for ki in k]))  # kernel offsets p, row-major
    groups, coefs = [], []
    for S in itertools.product((False, True), repeat=d):
        combos = list(itertools.product(*[border[i] if S[i] else [None] for i in range(d)]))
        if not combos:
            continue
        groups.append(combos)
        sign = -1.0 if sum(S) % 2 else 1.0
        for rows in combos:
            hit = [all(r is None or r in excl[i][p[i]] for i, r in enumerate(rows)) for p in offsets]
            coefs.append([sign if h else 0.0 for h in hit])
    kernel = [2 * ki - 1 for ki in k]
    strides = [math.prod(kernel[i + 1:]) for i in range(d)]
    idx = [[sum((q[i] - p[i] + k[i] - 1) * strides[i] for i in range(d)) for q in offsets] for p in offsets]
    return groups, torch.tensor(coefs, dtype=torch.float64), torch.tensor(idx)


def _full_correlation(x: Tensor, xw: Tensor, m: Sequence[int], corr) -> Tensor:
    """``[1, C, C, *(2m+1)]``: ``F_delta[o, c] = sum_{n,u} x[n, o, u] x[n, c, u + delta]`` for all
    shifts ``|delta_i| <= m_i``, from the shifts with ``delta_0 >= 0`` (a kernel ``m_0 + 1`` tall:
    ``(m_0 + 1) / (2 m_0 + 1)`` of the products) and ``F_{-delta} = F_delta^T`` for the rest."""
    H = corr(x, xw[:, :, m[0]:], 1)[0]  # [C, C, m0 + 1, *(2m+1)]: delta_0 = 0 .. m0
    spatial = list(range(2, H.dim()))
    neg = H[:, :, 1:].flip(spatial).transpose(0, 1)  # delta_0 = -m0 .. -1
    return torch.cat([neg, H], 2).unsqueeze(0)


def shift_gram(x: Tensor, k: Sequence[int], P: Sequence[int]) -> Tensor:
    """``sum_{n,t} a a^T`` ``[C prod(k), C prod(k)]`` of the patches ``a`` of ``x [N, C, *L]`` for
    kernel ``k``, symmetric zero padding ``P``, stride and dilation 1 (module docstring); exactly
    symmetric.

    Measured (CPU, 1 thread, loaded machine; 3x3, padding 1, batch 64), against unfolding and the
    patch Gram's weight-gradient kernel: 16 channels on 14x14 (``[144, 144]``) 2.1 ms against
    12 ms; 64 on 32x32 96 against 362 ms; 64 on 8x8 12 against 24 ms; 3 on 32x32 1.9 against
    2.9 ms; but 1 channel on 28x28 1.0 against 0.7 ms (inefficient single-channel kernels).
    """
    d = len(k)
    N, C = x.shape[:2]
    L = x.shape[2:]
    m = [ki - 1 for ki in k]
    pad = [v for mi in reversed(m) for v in (mi, mi)]
    xw = F.pad(x, pad)  # [N, C, *(L + 2m)]
    kernel = [2 * mi + 1 for mi in m]

    def corr(go: Tensor, inp: Tensor, J: int) -> Tensor:
        """``[J, C, C, *ks]``: ``sum_{n,u} go_j[n, o, u] inp_j[n, c, u + s]`` for ``J`` pairs
        stacked along the channels (one grouped weight-gradient kernel; ``ks`` the shifts)."""
        ks = [i - g for i, g in zip(inp.shape[2:], go.shape[2:])]
        w = x.new_empty(()).expand(J * C, C, *[v + 1 for v in ks])  # only its shape is read
        gw = torch.ops.aten.convolution_backward(
            go, inp, w, None, [1] * d, [0] * d, [1] * d, False, [0] * d, J, [False, True, False]
        )[1]
        return gw.view(J, C, C, *gw.shape[2:])

    groups, coef, idx = _plan(tuple(k), tuple(P), tuple(L))
    terms = []
    for combos in groups:  # one subset S of dimensions fixed to border rows (None: free)
        if all(r is None for r in combos[0]):  # the full correlation
            terms.append(_full_correlation(x, xw, m, corr))
            continue
        gos = [x[(slice(None), slice(None)) + tuple(slice(None) if r is None else slice(r, r + 1) for r in rows)]
               for rows in combos]
        inps = [xw[(slice(None), slice(None)) + tuple(slice(None) if r is None else slice(r, r + kw) for r, kw in zip(rows, kernel))]
                for rows in combos]
        J = len(combos)
        terms.append(corr(gos[0], inps[0], 1) if J == 1 else corr(torch.cat(gos, 1), torch.cat(inps, 1), J))
    T = torch.cat(terms).flatten(3)  # [J, C, C, S2]
    # (the cached plan is on the CPU: move it to x's device, or a GPU input fails here)
    M = torch.einsum("jp,jocs->ocps", coef.to(dtype=x.dtype, device=x.device), T)  # [C, C, P, S2]
    K = idx.shape[0]
    Ap = torch.gather(M, 3, idx.to(x.device).expand(C, C, K, K))  # [o, c, p, q]
    A = Ap.permute(0, 2, 1, 3).reshape(C * K, C * K)
    return (A + A.T).mul_(0.5)


__all__ = ["shift_gram", "shift_cost"]
