"""Embeddings ``nn.Embedding(V, D)``: ``y[n, t] = E[x[n, t]]`` for integer tokens ``x``.

The layer is the bias-free ``Linear(V, D)`` with weight ``E^T`` applied to one-hot inputs
``a_{n,t} = onehot(x_{n,t})`` (zero for ``padding_idx`` tokens, whose row gets no gradient).
The weight ``E`` ``[V, D]`` is ``[D_a, D_s]``, so the activation side is the *left* factor:

    dE_n = sum_t onehot(x_{n,t}) s_{n,t}^T       (s = output gradient ``[D]`` per token)

and ``p.kfac = [A, G]``. The expand activation factor of one-hot vectors is diagonal,
``A = diag(count_v) / (N T)`` (``count_v`` the occurrences of token ``v`` among the ``N T``
tokens, 0 for ``padding_idx``), returned 1-D (a 1-D factor is a diagonal matrix, docs/design.md
§2): memory ``V + D^2``, never ``V^2``. ``kfac_approx="reduce"`` averages the one-hot vectors
of a sample, whose Gram matrix is not diagonal when a sample has several tokens: it is
refused then (dense ``V x V``), and equals expand when every sample has one token.

Per-sample gradients are scattered (``index_add``) instead of multiplied with one-hot
vectors; the other exact extensions use the dense one-hot activations of :meth:`activations`
(``N T V`` numbers: fine for small vocabularies, their results are ``V D``-sized anyway).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvlib.engine.layers.base import LayerAdapter


class EmbeddingAdapter(LayerAdapter):
    positions = True
    module_types = (nn.Embedding,)
    act_side = "left"

    def check(self, module: nn.Module) -> None:
        if module.scale_grad_by_freq:
            raise NotImplementedError(
                f"curvlib: {module} uses scale_grad_by_freq=True, which scales each sample's "
                "gradient by the token counts of the whole batch (samples are coupled); "
                "per-sample curvature is undefined. Use scale_grad_by_freq=False."
            )

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        """A 1-D input ``[N]`` is read as ``N`` samples of one token each."""
        return 1 if x.ndim == 0 else x.shape[0]

    def _tokens(self, x: Tensor) -> Tensor:
        """``[N, T]`` token indices (a 1-D input ``[N]`` has one token per sample)."""
        return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(-1, 1)

    def _mask(self, module: nn.Module, tok: Tensor) -> Optional[Tensor]:
        return None if module.padding_idx is None else tok != module.padding_idx

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        tok = self._tokens(x)
        dt = module.weight.dtype
        a = F.one_hot(tok, module.num_embeddings).to(dt)
        mask = self._mask(module, tok)
        if mask is not None:
            a = a * mask.unsqueeze(-1).to(dt)
        return a

    def act_count(self, module: nn.Module, x: Tensor) -> int:
        return self._tokens(x).numel()

    def act_factor(self, module: nn.Module, x: Tensor, kfac_approx: str) -> Tensor:
        """1-D diagonal ``A`` ``[V]``: ``count_v / (N T)`` (expand)."""
        tok = self._tokens(x)
        N, T = tok.shape
        if kfac_approx == "reduce" and T > 1:
            raise NotImplementedError(
                f"curvlib: KFAC(kfac_approx='reduce') on {module} with {T} tokens per sample: "
                "the reduced activation factor of one-hot tokens is a dense V x V matrix. "
                "Use kfac_approx='expand' (diagonal token frequencies)."
            )
        flat = tok.reshape(-1)
        mask = self._mask(module, tok)
        w = module.weight
        ones = torch.ones(flat.shape, dtype=w.dtype, device=w.device)
        if mask is not None:
            ones = ones * mask.reshape(-1).to(w.dtype)
        counts = torch.zeros(module.num_embeddings, dtype=w.dtype, device=w.device)
        counts.index_add_(0, flat, ones)
        return counts.div_(N * T)

    def per_sample_weight(self, module: nn.Module, s: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """``X_{k,n} = sum_t onehot(x_{n,t}) s_{k,n,t}^T`` ``[K, N, V, D]`` by ``index_add``."""
        tok = self._tokens(x)
        K, N, T, D = s.shape
        V = module.num_embeddings
        X = out.view(K, N * V, D).zero_()
        idx = (tok + V * torch.arange(N, device=tok.device).unsqueeze(1)).reshape(-1)
        mask = self._mask(module, tok)
        src = s.reshape(K, N * T, D)
        if mask is not None:
            keep = mask.reshape(-1)
            idx, src = idx[keep], src[:, keep]
        X.index_add_(1, idx, src)
        return out

    def weight_cotangents(self, module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
        if x.ndim <= 1:
            return g.reshape(g.shape[0], -1, 1, g.shape[-1])
        return rearrange(g, "k n ... d -> k n (...) d")
