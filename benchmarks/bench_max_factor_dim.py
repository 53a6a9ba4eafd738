"""``max_factor_dim``: what a dense factor side costs, and what keeping it diagonal loses.

1. Cost of a dense ``d x d`` factor: memory ``4 d^2`` bytes (float32) and the ``eigh`` /
   Cholesky + inverse at each inverse update, for ``d`` in ``--dims`` (median of ``--reps``,
   interleaved).
2. Quality of a diagonal side against a block-diagonal one (blocks of ``b``) and the dense one, on
   the KFAC factors of a small language model (Embedding(V, 64) -> Linear -> Tanh -> Linear(64, V),
   mc Fisher, 8 x 16 tokens): the direction ``(kron(G', A) + λ I)^-1 g`` of the head's weight with
   ``G'`` the dense ``G``, its block-diagonal part or its diagonal; reported as the cosine to the
   dense direction and the relative error ``||d' - d|| / ||d||``; and the cost of inverting ``G'``.

Run: ``PYTHONPATH=. python benchmarks/bench_max_factor_dim.py [--dims 512 1024 2048] [--vocab 4096]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.solvers import KroneckerInverse


def factor_cost(dims, reps):
    times = {d: ([], []) for d in dims}
    mats = {}
    for d in dims:
        X = torch.randn(d + 16, d)
        mats[d] = X.T @ X / d + 1e-3 * torch.eye(d)
    for _ in range(reps):  # interleaved repetitions
        for d in dims:
            t = time.perf_counter()
            torch.linalg.eigh(mats[d])
            times[d][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.cholesky_inverse(torch.linalg.cholesky(mats[d]))
            times[d][1].append(time.perf_counter() - t)
    print("| d | dense factor (float32) | eigh (s) | cholesky + inverse (s) |\n|---|---|---|---|")
    for d in dims:
        e, c = (statistics.median(v) for v in times[d])
        print(f"| {d} | {4 * d * d / 2**20:.0f} MiB | {e:.2f} | {c:.2f} |")


def block_part(G, b):
    out = torch.zeros_like(G)
    for i in range(0, G.shape[0], b):
        out[i:i + b, i:i + b] = G[i:i + b, i:i + b]
    return out


def quality(V, blocks, damping, seed=0):
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Embedding(V, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, V)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, V, (8, 16)), torch.randint(0, V, (128,))
    with curvature(KFAC(fisher_type="mc", max_factor_dim=None)):
        loss_fn(model(x).flatten(0, 1), y).backward()
    W = model[3].weight
    G, A = W.kfac
    g = W.grad
    d = KroneckerInverse([[G, A]], damping, "exact")(g)
    rows = [("dense", G)] + [(f"block-diagonal b={b}", block_part(G, b)) for b in blocks] + [("diagonal (1-D)", G.diagonal())]
    print(f"\nhead Linear(64, {V}), mc, 8 x 16 tokens, damping {damping} (exact): direction against the dense G")
    print("| G side | cosine to dense | relative error | inverse build (s) |\n|---|---|---|---|")
    for name, Gp in rows:
        t = time.perf_counter()
        P = KroneckerInverse([[Gp, A]], damping, "exact")
        build = time.perf_counter() - t
        dp = P(g)
        cos = float((dp * d).sum() / (dp.norm() * d.norm()))
        err = float((dp - d).norm() / d.norm())
        print(f"| {name} | {cos:.4f} | {err:.3f} | {build:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--damping", type=float, default=1e-3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    factor_cost(args.dims, args.reps)
    quality(args.vocab, args.blocks, args.damping)


if __name__ == "__main__":
    main()
