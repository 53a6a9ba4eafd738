"""Layers called several times before one backward: an unrolled RNN cell.

``h_t = tanh(inp(x_t) + cell(h_{t-1}))`` for ``T`` steps (``inp`` Linear(64, 256) and ``cell``
Linear(256, 256) called ``T`` times each), head Linear(256, 10), CrossEntropy, batch 128,
float32. Each entry: forward + backward with the quantity computed. curvlinops' KFAC hooks
accumulate one Gram matrix per call of a shared module (its ``A`` sums over the calls, curvlib's
averages: the scaling differs, the work is the same). BackPACK does not support a module called
more than once. Interleaved repetitions, medians.

    python benchmarks/bench_shared.py [--T 16] [--reps 11]
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from common import backward_fn, curvlinops_kfac_fn, interleaved_medians, peak_memories, table

warnings.filterwarnings("ignore")


class UnrolledRNN(nn.Module):
    def __init__(self, D=64, H=256, C=10):
        super().__init__()
        self.H = H
        self.inp, self.cell, self.head = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):  # [N, T, D]
        h = torch.zeros(x.shape[0], self.H, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.cell(h))
        return self.head(h)


def setup(x, y):
    import curvlib
    from curvlib.extensions import KFAC, BatchGrad

    torch.manual_seed(0)
    ours = curvlib.extend(UnrolledRNN())
    ours_loss = curvlib.extend(nn.CrossEntropyLoss())
    plain, cl_model = UnrolledRNN(), UnrolledRNN()
    plain.load_state_dict(ours.state_dict())
    cl_model.load_state_dict(ours.state_dict())
    params = list(cl_model.parameters())

    run_plain = backward_fn(plain, nn.functional.cross_entropy, x, y)

    def run_ours(ext):
        return backward_fn(ours, ours_loss, x, y, lambda: curvlib.curvature(ext()))

    def run_cl(ft):
        return curvlinops_kfac_fn(cl_model, params, x, y, ft)

    return {
        "plain fwd+bwd": run_plain,
        "curvlib KFAC empirical": run_ours(lambda: KFAC(fisher_type="empirical")),
        "curvlib KFAC mc": run_ours(lambda: KFAC(fisher_type="mc")),
        "curvlib KFAC type-2": run_ours(lambda: KFAC(fisher_type="type-2")),
        "curvlib BatchGrad": run_ours(lambda: BatchGrad(reuse_buffers=False)),
        "curvlinops KFAC empirical": run_cl("empirical"),
        "curvlinops KFAC mc": run_cl("mc"),
        "curvlinops KFAC type-2": run_cl("type-2"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--T", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, args.T, 64), torch.randint(0, 10, (128,))
    fns = setup(x, y)
    name = f"unrolled RNN cell, T={args.T}, batch 128, float32"
    med = interleaved_medians(fns, reps=args.reps)
    mem = peak_memories(name, fns)
    base = med["plain fwd+bwd"]
    rows = [[k, f"{v * 1e3:.2f}", f"{v / base:.2f}", f"{mem[k]:.1f}"] for k, v in med.items()]
    print(f"\n## {name}\n")
    print(table(rows, ["method", "median ms", "x plain", "peak RSS +MiB"]))
    for ft in ("empirical", "mc", "type-2"):
        print(f"KFAC {ft}: curvlib / curvlinops = {med[f'curvlib KFAC {ft}'] / med[f'curvlinops KFAC {ft}']:.2f}")


if __name__ == "__main__":
    main()
