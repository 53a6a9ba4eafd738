"""KFAC factor computation: curvlib vs BackPACK (KFAC, KFLR) vs curvlinops.

MLP 784-512-256-10 (ReLU), batch 256, CrossEntropy, float32, 2 threads; and a small CNN.
Each entry: forward + backward with the factors computed. Interleaved repetitions, medians.

    python benchmarks/bench_kfac.py
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from common import backward_fn, curvlinops_kfac_fn, model_copies, timing_report

warnings.filterwarnings("ignore")


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def setup(make_model, x, y):
    from backpack import backpack
    from backpack.extensions import KFAC as BPKFAC, KFLR as BPKFLR

    import curvlib
    from curvlib.extensions import KFAC

    copies = model_copies(make_model)
    (ours, ours_loss), (bp, bp_loss), (plain, plain_loss) = copies["curvlib"], copies["backpack"], copies["plain"]
    cl_model = make_model()
    cl_model.load_state_dict(ours.state_dict())
    params = [p for p in cl_model.parameters()]

    run_plain = backward_fn(plain, plain_loss, x, y)

    def run_ours(ft):
        return backward_fn(ours, ours_loss, x, y, lambda: curvlib.curvature(KFAC(fisher_type=ft)))

    def run_bp(ext):
        return backward_fn(bp, bp_loss, x, y, lambda: backpack(ext()))

    def run_cl(ft):
        return curvlinops_kfac_fn(cl_model, params, x, y, ft)

    return {
        "plain fwd+bwd": run_plain,
        "curvlib empirical": run_ours("empirical"),
        "curvlib mc": run_ours("mc"),
        "curvlib type-2": run_ours("type-2"),
        "backpack KFAC (mc)": run_bp(BPKFAC),
        "backpack KFLR (type-2)": run_bp(BPKFLR),
        "curvlinops empirical": run_cl("empirical"),
        "curvlinops mc": run_cl("mc"),
        "curvlinops type-2": run_cl("type-2"),
    }


#: issue 8's targets per workload (ratio names as printed; None: no target there)
TARGETS = {
    "MLP": {"empirical / plain": None, "mc / backpack KFAC": 0.75, "type-2 / backpack KFLR": 0.40, "type-2 / curvlinops type-2": None},
    "CNN": {"empirical / plain": 2.0, "mc / backpack KFAC": None, "type-2 / backpack KFLR": 0.5, "type-2 / curvlinops type-2": 0.5},
}


def report(name, fns, reps):
    med = timing_report(name, fns, reps)
    print()
    ratios = {
        "empirical / plain": ("curvlib empirical", "plain fwd+bwd"),
        "mc / backpack KFAC": ("curvlib mc", "backpack KFAC (mc)"),
        "type-2 / backpack KFLR": ("curvlib type-2", "backpack KFLR (type-2)"),
        "type-2 / curvlinops type-2": ("curvlib type-2", "curvlinops type-2"),
    }
    targets = TARGETS[name.split()[0]]
    for label, (a, b) in ratios.items():
        t = targets[label]
        print(f"{label:27s} = {med[a] / med[b]:.2f}" + (f"  (target <= {t})" if t is not None else ""))
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cnn", dest="cnn", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    report("MLP 784-512-256-10, batch 256, float32", setup(mlp, x, y), args.reps)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if args.cnn:
        report("CNN conv16-conv32-linear on 28x28, batch 64, float32", setup(cnn, x, y), args.reps)


if __name__ == "__main__":
    main()
