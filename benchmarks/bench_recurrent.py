"""Recurrent layers (issue 21): an extended LSTM tagger-classifier (2 layers, hidden 128, input 64,
sequence 32, batch 32, 10 classes from the last step) run unrolled by curvlib against the plain
fused module.

Rows (forward + backward, median seconds over interleaved repetitions):

- ``fused, not extended``: the plain module (PyTorch's kernel; oneDNN for float32 LSTM on CPU);
  ``fused, native kernel``: the same with oneDNN off (PyTorch's own CPU kernel, whose operations
  the unrolled path repeats);
- ``extended, plain backward``: the extended model outside any curvature context (the unrolled
  forward runs for every forward with gradients, since the forward cannot know whether the
  backward will be captured);
- ``extended, KFAC mc`` / ``KFAC type-2``: the backward inside ``curvature(KFAC(...))``;
- ``extended, forward only``: the forward of the extended model (with gradients), alone, against
  ``fused, forward only``.

    python benchmarks/bench_recurrent.py [--reps 15] [--threads 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from common import backward_fn, interleaved_medians, table


class Classifier(nn.Module):
    def __init__(self, cell=nn.LSTM, d_in: int = 64, hidden: int = 128, layers: int = 2, classes: int = 10):
        super().__init__()
        self.rnn = cell(d_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def forward_fn(model, x):
    def fn():
        model(x)
    return fn


def main() -> None:
    import curvlib
    from curvlib.extensions import KFAC

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cell", default="LSTM")
    ap.add_argument("--clock", default="process", choices=["process", "wall"],
                    help="process: the process's CPU time (a loaded shared machine inflates it much less)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="TF32 acceleration")  # from torch.backends.mkldnn.flags
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    plain = Classifier(getattr(nn, args.cell)).to(dtype)
    ours = curvlib.extend(copy.deepcopy(plain))
    plain_loss, loss_fn = nn.CrossEntropyLoss(), curvlib.extend(nn.CrossEntropyLoss())
    x, y = torch.randn(32, 32, 64, dtype=dtype), torch.randint(0, 10, (32,))
    def native(fn):
        def run():
            with torch.backends.mkldnn.flags(enabled=False):
                fn()
        return run

    fns = {
        "fused, not extended": backward_fn(plain, plain_loss, x, y),
        "fused, native kernel": native(backward_fn(plain, plain_loss, x, y)),
        "extended, plain backward": backward_fn(ours, loss_fn, x, y),
        "extended, KFAC mc": backward_fn(ours, loss_fn, x, y, lambda: curvlib.curvature(KFAC(fisher_type="mc"))),
        "extended, KFAC type-2": backward_fn(ours, loss_fn, x, y, lambda: curvlib.curvature(KFAC(fisher_type="type-2"))),
        "fused, forward only": forward_fn(plain, x),
        "extended, forward only": forward_fn(ours, x),
    }
    t = interleaved_medians(fns, reps=args.reps, clock=clock)
    base = t["fused, not extended"]
    rows = [[k, f"{v * 1e3:.1f}", f"{v / base:.2f}x"] for k, v in t.items() if "forward only" not in k]
    fbase = t["fused, forward only"]
    rows += [[k, f"{t[k] * 1e3:.1f}", f"{t[k] / fbase:.2f}x (of the fused forward)"]
             for k in ("fused, forward only", "extended, forward only")]
    print(f"{args.cell} 64-128x2, seq 32, batch 32, {args.dtype}, {args.threads} thread(s), {args.clock} time, "
          f"median of {args.reps}")
    print(table(rows, ["", "ms", "vs fused"]))


if __name__ == "__main__":
    main()
