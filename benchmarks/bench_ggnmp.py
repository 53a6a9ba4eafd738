"""GGN products: curvlib GGNMP vs BackPACK GGNMP (block products) and curvlinops
GGNLinearOperator (whole-network matvec).

MLP 784-256-128-10 (sigmoid), batch 128, CrossEntropy, float32, 2 threads.

(a) forward + backward with the block-product extension, then one block product (V = 1)
    per parameter: curvlib ``GGNMP()`` vs BackPACK ``GGNMP()``.
(b) one whole-network GGN matvec after the backward: ``ext.operator()(v)`` vs curvlinops
    ``GGNLinearOperator(model, loss, params, [(x, y)], check_deterministic=False) @ v``
    (both operators built outside the timed region).

Interleaved repetitions, medians, peak memory (torch profiler).

    python benchmarks/bench_ggnmp.py
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from common import model_copies, sigmoid_mlp, timing_report

warnings.filterwarnings("ignore")


def setup(x, y):
    from backpack import backpack
    from backpack.extensions import GGNMP as BPGGNMP
    from curvlinops import GGNLinearOperator

    import curvlib
    from curvlib.extensions.ggnmp import GGNMP

    copies = model_copies(sigmoid_mlp)
    (ours, ours_loss), (bp, bp_loss), (plain, plain_loss) = copies["curvlib"], copies["backpack"], copies["plain"]
    cl_model = sigmoid_mlp()
    cl_model.load_state_dict(ours.state_dict())
    cl_params = list(cl_model.parameters())
    Vs = [torch.randn(1, *p.shape) for p in ours.parameters()]
    vs = [V[0] for V in Vs]

    def run_plain():
        plain.zero_grad()
        plain_loss(plain(x), y).backward()

    ext = GGNMP()

    def run_ours_blocks():
        ours.zero_grad()
        loss = ours_loss(ours(x), y)
        with curvlib.curvature(ext):
            loss.backward()
        for p, V in zip(ours.parameters(), Vs):
            p.ggnmp(V)

    def run_bp_blocks():
        bp.zero_grad()
        loss = bp_loss(bp(x), y)
        with backpack(BPGGNMP()):
            loss.backward()
        for p, V in zip(bp.parameters(), Vs):
            p.ggnmp(V)

    run_ours_blocks()
    F = ext.operator()
    cl_op = GGNLinearOperator(cl_model, nn.CrossEntropyLoss(), cl_params, [(x, y)], check_deterministic=False)

    # sanity: the three agree
    for a, b in zip(F(vs), cl_op @ vs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    run_bp_blocks()
    for p, q, V in zip(ours.parameters(), bp.parameters(), Vs):
        torch.testing.assert_close(p.ggnmp(V), q.ggnmp(V), rtol=1e-3, atol=1e-6)

    blocks = {
        "plain fwd+bwd": run_plain,
        "curvlib GGNMP fwd+bwd+blocks": run_ours_blocks,
        "backpack GGNMP fwd+bwd+blocks": run_bp_blocks,
    }
    matvec = {
        "curvlib operator matvec": lambda: F(vs),
        "curvlinops GGN matvec": lambda: cl_op @ vs,
    }
    return blocks, matvec


def report(title, fns, reps, base):
    return timing_report(title, fns, reps, base=base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    blocks, matvec = setup(x, y)
    head = "MLP 784-256-128-10 (sigmoid), batch 128, CE, float32"
    a = report(f"(a) {head}: backward + one block product per parameter", blocks, args.reps, "plain fwd+bwd")
    b = report(f"(b) {head}: one whole-network GGN matvec", matvec, 5 * args.reps, "curvlinops GGN matvec")
    print()
    ra = a["curvlib GGNMP fwd+bwd+blocks"] / a["backpack GGNMP fwd+bwd+blocks"]
    rb = b["curvlib operator matvec"] / b["curvlinops GGN matvec"]
    print(f"(a) curvlib / backpack GGNMP          = {ra:.2f}  (target <= 1.0)")
    print(f"(b) curvlib operator / curvlinops GGN = {rb:.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
