"""KPSVD / KFAC corrected vs KFAC: forward + backward with the curvature computed.

MLP 784-256-128-10 (sigmoid), batch 128, CrossEntropy, float32, 2 threads (target: KPSVD rank 1
by power iteration <= 3x KFAC type-2). KPSVD uses the exact type-2 blocks. "cold": a fresh
extension each call (start R^T vec(I)); "warm": one extension reused, so each call starts from
the previous call's left factors -- on a *different* batch each call (4 batches in rotation,
as in training), so the warm start is not the answer already. Interleaved repetitions, medians.

    python benchmarks/bench_kpsvd.py [--reps 15] [--threads 2] [--cnn]
"""
from __future__ import annotations

import argparse
import itertools
import warnings

import torch
from torch import nn

from common import timing_report

warnings.filterwarnings("ignore", category=DeprecationWarning)  # solver non-convergence stays visible


def mlp():
    return nn.Sequential(nn.Linear(784, 256), nn.Sigmoid(), nn.Linear(256, 128), nn.Sigmoid(), nn.Linear(128, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


def setup(make_model, batches):
    import curvlib
    from curvlib.extensions.kfac import KFAC
    from curvlib.extensions.kfac_corrected import KFACCorrected
    from curvlib.extensions.kpsvd import KPSVD

    torch.manual_seed(0)
    model = curvlib.extend(make_model())
    loss_fn = curvlib.extend(nn.CrossEntropyLoss())
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    plain_loss = nn.CrossEntropyLoss()

    def runner(make_ext, fresh):
        cycle = itertools.cycle(batches)
        ext = make_ext()

        def fn():
            x, y = next(cycle)
            model.zero_grad()
            loss = loss_fn(model(x), y)
            with curvlib.curvature(make_ext() if fresh else ext):
                loss.backward()
        return fn

    def run_plain():
        x, y = batches[0]
        plain.zero_grad()
        plain_loss(plain(x), y).backward()

    return {
        "plain fwd+bwd": run_plain,
        "KFAC type-2": runner(lambda: KFAC("type-2"), True),
        "KPSVD r1 power cold": runner(lambda: KPSVD("type-2", warm_start=False), True),
        "KPSVD r1 power warm": runner(lambda: KPSVD("type-2"), False),
        "KPSVD r1 lanczos warm": runner(lambda: KPSVD("type-2", method="lanczos"), False),
        "KPSVD r2 deflation warm": runner(lambda: KPSVD("type-2", rank=2, method="deflation"), False),
        "KPSVD r2 lanczos warm": runner(lambda: KPSVD("type-2", rank=2, method="lanczos"), False),
        "KFACCorrected (lanczos) warm": runner(lambda: KFACCorrected("type-2"), False),
    }


def report(name, model, fns, reps, threads):
    med = timing_report(name, fns, reps, base="KFAC type-2")
    kfac = med["KFAC type-2"]
    print()
    for key in ("KPSVD r1 power cold", "KPSVD r1 power warm"):
        print(f"{key} / KFAC type-2 = {med[key] / kfac:.2f}  (target <= 3)")
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cnn", action="store_true", help="also a small sigmoid CNN on 28x28, batch 64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = ["mlp", "cnn"] if args.cnn else ["mlp"]
    for model in models:
        make, batches, title = problem(model)
        report(f"{title}, float32, {args.threads} threads", model, setup(make, batches), args.reps, args.threads)


def problem(model):
    torch.manual_seed(0)
    if model == "mlp":
        batches = [(torch.randn(128, 784), torch.randint(0, 10, (128,))) for _ in range(4)]
        return mlp, batches, "MLP 784-256-128-10 sigmoid, batch 128"
    batches = [(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))) for _ in range(4)]
    return cnn, batches, "CNN conv8-conv16-linear sigmoid on 28x28, batch 64"


if __name__ == "__main__":
    main()
