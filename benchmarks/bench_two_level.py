"""Cost of two-level KFAC per step against KFAC (experiment 2 of issue 10), side by side.

Each method trains the experiment's model (``examples/exp_two_level.py``: the demo CNN, batch
128, or the MLP autoencoder, batch 512; T_cov 1, T_inv 10) on a fixed sequence of minibatches;
one timed call is ``--block`` steps (default 10 = T_inv, so every call holds one inversion of
the KFAC factors), and calls are interleaved round robin over the methods, ``--reps`` times
after one warm-up call; the table gives the median seconds per step and the ratio to KFAC.

    python benchmarks/bench_two_level.py --model cnn [--reps 3] [--block 10] [--threads 1]
    python benchmarks/bench_two_level.py --model autoencoder --reps 2
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from common import interleaved_medians, table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
from examples import _experiment as E  # noqa: E402
from examples import exp_two_level as X  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["cnn", "autoencoder"], default="cnn")
    p.add_argument("--methods", nargs="+", default=X.method_names(mult=False), choices=X.method_names())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each method first")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    xargs = X.parse_args(["--model", args.model, "--no-progress"])
    # the experiment's model, data and loss, without its training loop
    captured = {}

    def fake_run(name, title, a, methods, make, step_loss, evaluate, n, **kw):
        captured.update(methods=methods, make=make, step_loss=step_loss, n=n)
        return {}

    real, E.run_experiment = E.run_experiment, fake_run
    try:
        X.run(xargs)
    finally:
        E.run_experiment = real
    batches = E.epoch_batches(captured["n"], xargs.batch_size, 1, 0)[0]
    fns = {}
    for m in args.methods:
        torch.manual_seed(0)
        model = captured["make"]()
        opt = captured["methods"][m].make(model)
        state = {"i": 0}

        def block(model=model, opt=opt, state=state):
            for _ in range(args.block):
                idx = batches[state["i"] % len(batches)]
                state["i"] += 1
                opt.zero_grad()
                loss = captured["step_loss"](model, idx)
                with opt.capture():
                    loss.backward()
                opt.step()

        fns[m] = block
    med = interleaved_medians(fns, reps=args.reps, warmup=args.warmup)
    ref = med.get("kfac")
    rows = [[m, f"{t / args.block:.3f}", f"{t / ref:.2f}" if ref else "-"] for m, t in med.items()]
    print(f"two-level cost per step, {args.model}, batch {xargs.batch_size}, blocks of {args.block} steps, "
          f"{args.reps} interleaved reps (median) after {args.warmup} warm-up, {args.threads} thread(s)")
    print(table(rows, ["method", "s / step", "x KFAC"]))


if __name__ == "__main__":
    main()
