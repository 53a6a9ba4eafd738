"""``bench_kfac.py``'s MLP rows timed by process CPU time instead of wall time.

On a shared machine, wall-clock medians move with the other processes' load (the plain
backward alone from 7.5 to 11.5 ms between two runs on 2 busy cores); with one thread, the
process's own CPU time moves far less (it still includes cache and memory-bandwidth
contention). Same methods and set-up as ``bench_kfac.py`` (its ``setup``), interleaved
repetitions, medians; curvlinops left out unless ``--curvlinops``.

    python benchmarks/bench_kfac_cpu_time.py            # 1 thread
    python benchmarks/bench_kfac_cpu_time.py --threads 2
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from bench_kfac import mlp, setup
from common import interleaved_medians, table

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curvlinops", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    fns = setup(mlp, x, y)
    if not args.curvlinops:
        fns = {k: v for k, v in fns.items() if not k.startswith("curvlinops")}
    med = interleaved_medians(fns, reps=args.reps, clock=time.process_time)
    base = med["plain fwd+bwd"]
    print(f"\n## MLP 784-512-256-10, batch 256, float32, {args.threads} thread(s), process CPU time\n")
    print(table([[k, f"{v * 1e3:.2f}", f"{v / base:.2f}"] for k, v in med.items()], ["method", "median ms", "x plain"]))
    r = lambda a, b: med[a] / med[b]
    print()
    print(f"mc / backpack KFAC          = {r('curvlib mc', 'backpack KFAC (mc)'):.2f}")
    print(f"type-2 / backpack KFLR      = {r('curvlib type-2', 'backpack KFLR (type-2)'):.2f}")


if __name__ == "__main__":
    main()
