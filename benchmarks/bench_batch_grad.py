"""Per-sample gradients and the GGN diagonal: curvlib vs BackPACK.

MLP 784-256-128-10 (sigmoids), batch 128, CrossEntropy, float32, 2 threads. Each entry is a
training-loop step: forward + backward with the quantity computed (the previous step's
results still attached to the parameters, as in a training loop). Interleaved repetitions,
medians, peak memory.

What limits BatchGrad: it must write N * numel = 115 MiB of float32 per step. BackPACK (and
curvlib with ``reuse_buffers=False``) writes them to a freshly allocated tensor; on CPU that
memory comes from a new ``mmap`` whose pages the kernel faults in and zeroes on first touch,
~6x the cost of the writes. curvlib overwrites the previous ``p.grad_batch`` in place (when
nothing else holds it), so a step costs the plain backward plus the write floor
(``fill_`` of the same buffers). "peak RSS +MiB" is ``common.peak_memories`` (resident
memory high-water mark of one step above the resident size before it).

    python benchmarks/bench_batch_grad.py
"""
from __future__ import annotations

import argparse
import warnings

import torch

from common import interleaved_medians, model_copies, peak_memories, sigmoid_mlp, table

warnings.filterwarnings("ignore")


def setup(x, y):
    from backpack import backpack
    from backpack.extensions import BatchGrad as BPBatchGrad, DiagGGNExact as BPDiagGGNExact

    import curvlib
    from curvlib.extensions.batch_grad import BatchGrad
    from curvlib.extensions.diag_ggn import DiagGGN

    copies = model_copies(sigmoid_mlp)
    (ours, ours_loss), (bp, bp_loss), (plain, plain_loss) = copies["curvlib"], copies["backpack"], copies["plain"]

    def run_plain():
        plain.zero_grad()
        plain_loss(plain(x), y).backward()

    def run_ours(make_ext):
        def fn():
            ours.zero_grad()
            loss = ours_loss(ours(x), y)
            with curvlib.curvature(make_ext()):
                loss.backward()
        return fn

    def run_bp(make_ext):
        def fn():
            bp.zero_grad()
            loss = bp_loss(bp(x), y)
            with backpack(make_ext()):
                loss.backward()
        return fn

    return {
        "plain fwd+bwd": run_plain,
        "curvlib BatchGrad": run_ours(BatchGrad),
        "curvlib BatchGrad(reuse_buffers=False)": run_ours(lambda: BatchGrad(reuse_buffers=False)),
        "backpack BatchGrad": run_bp(BPBatchGrad),
        "curvlib DiagGGN(type-2)": run_ours(lambda: DiagGGN(fisher_type="type-2")),
        "backpack DiagGGNExact": run_bp(BPDiagGGNExact),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    fns = setup(x, y)
    med = interleaved_medians(fns, reps=args.reps)
    mem = peak_memories("batch_grad", fns)
    base = med["plain fwd+bwd"]
    rows = [[k, f"{v * 1e3:.2f}", f"{v / base:.2f}", f"{mem[k]:.1f}"] for k, v in med.items()]
    print("\n## MLP 784-256-128-10 (sigmoid), batch 128, CrossEntropy, float32, "
          f"{args.threads} threads\n")
    print(table(rows, ["method", "median ms", "x plain", "peak RSS +MiB"]))
    r = lambda a, b: med[a] / med[b]
    print()
    print(f"BatchGrad / backpack BatchGrad                     = "
          f"{r('curvlib BatchGrad', 'backpack BatchGrad'):.2f}  (target <= 0.5)")
    print(f"BatchGrad(reuse_buffers=False) / backpack BatchGrad = "
          f"{r('curvlib BatchGrad(reuse_buffers=False)', 'backpack BatchGrad'):.2f}")
    print(f"DiagGGN / backpack DiagGGNExact                    = "
          f"{r('curvlib DiagGGN(type-2)', 'backpack DiagGGNExact'):.2f}")


if __name__ == "__main__":
    main()
