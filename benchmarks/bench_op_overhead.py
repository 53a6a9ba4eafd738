"""What the operation capture costs models that do not need it: bench_kfac.py's MLP and CNN, whose
parameters are all in adapted modules (the mode never activates; what remains is the engine's
per-call bookkeeping: batch sizes, merged-row layouts, the check for parameters outside adapters).

A/B against another source tree of curvlib (``--base``, e.g. ``git archive trial-merge | tar -x
-C /tmp/base``): rounds alternate a child process per tree; each child times ``reps`` interleaved
repetitions of the plain forward + backward and of the KFAC captures (CPU time of the process),
medians. Reported: the median over rounds of each tree's median, the ratio this tree / base, and
the median over rounds of that ratio for the time relative to the same child's plain forward +
backward (which does not run curvlib: it measures the load of the moment).

    python benchmarks/bench_op_overhead.py --base /tmp/base [--rounds 6] [--reps 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(reps: int, threads: int) -> None:
    import torch
    from torch import nn

    import curvlib
    from bench_kfac import cnn, mlp
    from common import backward_fn, interleaved_medians
    from curvlib.extensions import KFAC

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {}
    for name, make, x in (("MLP", mlp, torch.randn(256, 784)), ("CNN", cnn, torch.randn(64, 1, 28, 28))):
        y = torch.randint(0, 10, (x.shape[0],))
        model, loss_fn = curvlib.extend(make()), curvlib.extend(nn.CrossEntropyLoss())
        fns = {"plain fwd+bwd": backward_fn(make(), nn.CrossEntropyLoss(), x, y)}
        for ft in ("empirical", "mc"):
            fns[f"KFAC {ft}"] = backward_fn(model, loss_fn, x, y, lambda ft=ft: curvlib.curvature(KFAC(fisher_type=ft)))
        for k, v in interleaved_medians(fns, reps=reps, warmup=2, clock=time.process_time).items():
            out[f"{name} {k}"] = v
    print(json.dumps({"file": curvlib.__file__, **out}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="root of the other curvlib source tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.reps, args.threads)
        return
    trees = {"this": os.path.dirname(HERE), "base": os.path.abspath(args.base)}
    runs = {k: [] for k in trees}
    for r in range(args.rounds):
        for tree, root in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, HERE]), OMP_NUM_THREADS=str(args.threads))
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--base", args.base, "--child",
                                  "--reps", str(args.reps), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True, cwd=HERE)
            d = json.loads(res.stdout.strip().splitlines()[-1])
            assert d.pop("file").startswith(root), (tree, root)
            runs[tree].append(d)
            print(tree, {k: f"{v * 1e3:.2f}" for k, v in d.items()}, flush=True)
    from common import table

    rows = []
    for key in runs["this"][0]:
        a = [d[key] for d in runs["this"]]
        b = [d[key] for d in runs["base"]]
        ratios = [x / y for x, y in zip(a, b)]
        # the same ratio of times relative to the plain fwd+bwd of the same child (load-normalised)
        plain = key.split(" ")[0] + " plain fwd+bwd"
        norm = [(x / dx[plain]) / (y / dy[plain]) for x, y, dx, dy in zip(a, b, runs["this"], runs["base"])]
        rows.append([key, f"{statistics.median(b) * 1e3:.2f}", f"{statistics.median(a) * 1e3:.2f}",
                     f"{statistics.median(a) / statistics.median(b):.3f}", f"{min(ratios):.3f}-{max(ratios):.3f}",
                     f"{statistics.median(norm):.3f}"])
    print(table(rows, ["model, run", "base ms", "this ms", "this/base (medians)", "per-round ratio range",
                       "this/base of time/plain (median)"]))


if __name__ == "__main__":
    main()
